"""The config chooses the executor, and a memory budget sizes the block pool."""

from __future__ import annotations

import msgspec
import pytest

from kvroute.replicas.executor import SimulatedExecutor
from kvroute.replicas.executor_torch import TorchExecutor
from kvroute.replicas.factory import build_kv_cache_config
from kvroute.replicas.request import SamplingParams
from kvroute.router.config import ConfigError, parse_config
from tests.replicas.model.helpers import engine, executor, settings


def _budgeted(memory: str, hybrid: bool = True):  # type: ignore[no-untyped-def]
    config = settings(hybrid=hybrid)
    return msgspec.structs.replace(
        config, replicas=msgspec.structs.replace(config.replicas, kv_cache_memory=memory)
    )


def test_memory_budget_sizes_the_pool_that_the_executor_allocates() -> None:
    # A block: 4 tokens x 2 heads x 8 x (K, V) x 4 bytes = 512 B per layer; the
    # hybrid model's 4 layers share 2 tensor pairs across its 2 groups -> 1 KiB.
    config = _budgeted("64KiB")
    kv_cache_config = build_kv_cache_config(config)
    assert kv_cache_config.num_blocks == 64
    assert [t.shared_by for t in kv_cache_config.kv_cache_tensors] == [
        ["model.layers.0", "model.layers.1"],
        ["model.layers.2", "model.layers.3"],
    ]
    assert [g.layer_names for g in kv_cache_config.kv_cache_groups] == [
        ["model.layers.0", "model.layers.2"],
        ["model.layers.1", "model.layers.3"],
    ]
    memory = executor(engine(config)).memory
    allocated = sum(t.numel() * t.element_size() for t in [*memory.k, *memory.v])
    # Each of the 2 K and 2 V tensors has one zero page (256 B) past the pool.
    assert allocated == 64 * 1024 + 4 * 256
    assert sum(t.size for t in kv_cache_config.kv_cache_tensors) == 64 * 1024


def test_the_router_config_sees_the_model_replicas_will_build() -> None:
    data = {
        "model": {"groups": [{"kind": "full_attention", "num_kv_heads": 2, "head_size": 32}]},
        "replicas": {"kv_cache_memory": "1MiB"},
    }
    # 16 tokens x 2 x 32 x 2 x bf16 = 4 KiB per block and layer, 2 layers.
    assert parse_config(data).model.num_blocks == 128
    with pytest.raises(ConfigError, match="kv_cache_memory: cannot read '1MB'"):
        parse_config({**data, "replicas": {"kv_cache_memory": "1MB"}})
    with pytest.raises(ConfigError, match="holds 0 blocks"):
        parse_config({**data, "replicas": {"kv_cache_memory": "1KiB"}})
    mamba = {"model": {"groups": [{"kind": "full_attention"}, {"kind": "mamba"}]}}
    parse_config(mamba)  # the simulated executor models any group
    with pytest.raises(ConfigError, match=r"model.groups\[1\] is a mamba group"):
        parse_config({**mamba, "replicas": {"executor": "torch"}})


def test_config_chooses_the_executor_and_whether_step_time_is_real() -> None:
    """A torch step's duration was spent computing (the actor must not sleep it);
    a simulated one is virtual time (the actor sleeps it)."""
    config = settings(hybrid=False)
    e = engine(config)
    assert isinstance(e.executor, TorchExecutor)
    e.add_request("a", [1, 2, 3], SamplingParams(max_tokens=1))
    assert e.step().duration_is_real
    simulated = msgspec.structs.replace(
        config, replicas=msgspec.structs.replace(config.replicas, executor="simulated")
    )
    e = engine(simulated)
    assert isinstance(e.executor, SimulatedExecutor)
    assert e.kv_cache.kv_cache_config.kv_cache_tensors == []
    e.add_request("a", [1, 2, 3], SamplingParams(max_tokens=1))
    result = e.step()
    assert not result.duration_is_real and result.duration > 0
