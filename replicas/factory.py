"""Build an engine exactly as a replica config describes it (no Ray needed).

The Ray actor and the simulator both call `build_engine`, so a simulated
replica is the same engine, cache manager and executor as a live one.
"""

from __future__ import annotations

from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.replicas.clock import Clock
from kvroute.replicas.config import ReplicaSettings
from kvroute.replicas.engine import Engine, EngineConfig
from kvroute.replicas.executor import CostModel, Executor, SimulatedExecutor
from kvroute.replicas.executor_torch import TorchExecutor, resolve_device
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.specs import KVCacheConfig
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from kvroute.replicas.model.config import attention_specs, model_arch
from kvroute.replicas.model.kv_memory import kv_cache_tensors, resolve_model
from kvroute.replicas.model.weights import load_model


def build_engine(
    config: ReplicaSettings,
    clock: Clock,
    seed_offset: int = 0,
    events: bool = True,
    *,
    log_stats: bool = False,
    none_hash: BlockHash | None = None,
    data_parallel_rank: int = 0,
) -> Engine:
    """An engine (with its cache manager) exactly as the config describes it.

    `none_hash` replaces the hash chain's root `hash_fn(hashing.seed)` (a standalone
    replica roots it as vLLM does, see `init_none_hash`); `log_stats` keeps the
    prefix-cache counters vLLM's metrics report."""
    model, replicas = config.model, config.replicas
    kv_cache_config = build_kv_cache_config(config)
    hash_fn = get_hash_fn_by_name(config.hashing.algo)
    manager = KVCacheManager(
        kv_cache_config,
        max_model_len=model.max_model_len,
        hash_block_size=model.hash_block_size,
        enable_caching=replicas.enable_prefix_caching,
        use_eagle=model.use_eagle,
        enable_kv_cache_events=events,
        max_num_batched_tokens=replicas.max_num_batched_tokens,
        prefix_cache_retention_interval=replicas.retention_interval,
        probation_fraction=replicas.probation_fraction,
        log_stats=log_stats,
    )
    executor = build_executor(config, manager, seed=replicas.seed + seed_offset)
    engine_config = EngineConfig(
        max_num_seqs=replicas.max_num_seqs,
        max_num_batched_tokens=replicas.max_num_batched_tokens,
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
        lora_names=tuple(model.lora_names),
        eos_token_ids=executor.eos_token_ids if isinstance(executor, TorchExecutor) else (),
    )
    if none_hash is None:
        none_hash = BlockHash(hash_fn(config.hashing.seed))
    hasher = RequestBlockHasher(model.hash_block_size, hash_fn, none_hash)
    return Engine(manager, engine_config, executor, clock, hasher, data_parallel_rank)


def build_kv_cache_config(config: ReplicaSettings) -> KVCacheConfig:
    """The model's groups over one pool of blocks (`model.num_blocks`, or as many
    as `replicas.kv_cache_memory` holds); for the torch executor, also the shared
    K/V tensors and the layers of each group."""
    model = resolve_model(config.model, config.replicas)
    kv_cache_config = model.kv_cache_config()
    if config.replicas.executor == "simulated":
        return kv_cache_config
    arch = model_arch(model)
    spec = attention_specs(model)[0]
    kv_cache_config.kv_cache_tensors = kv_cache_tensors(spec, arch, kv_cache_config.num_blocks)
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        group.layer_names = [
            f"model.layers.{i}" for i in range(arch.num_layers) if arch.layer_group(i) == g
        ]
    return kv_cache_config


def build_executor(config: ReplicaSettings, manager: KVCacheManager, seed: int) -> Executor:
    model, replicas = config.model, config.replicas
    if replicas.executor == "simulated":
        cost = replicas.cost
        return SimulatedExecutor(
            CostModel(
                prefill_tokens_per_s=cost.prefill_tokens_per_s,
                step_base_s=cost.step_base_s,
                decode_s_per_seq=cost.decode_s_per_seq,
                kv_read_s_per_block=cost.kv_read_s_per_block,
            ),
            vocab_size=model.vocab_size,
            seed=seed,
        )
    device = resolve_device(replicas.device)
    return TorchExecutor(
        load_model(model, device),
        model,
        manager,
        device,
        seed=seed,
        poison_free_blocks=replicas.poison_free_blocks,
    )
