"""Tiny torch-executor replicas and a recorder that checks them against dense attention."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvroute.replicas.clock import VirtualClock
from kvroute.replicas.config import (
    EventsConfig,
    GroupConfig,
    HashingConfig,
    ModelConfig,
    ReplicasConfig,
    ReplicaSettings,
)
from kvroute.replicas.engine import Engine, RequestOutput
from kvroute.replicas.executor import ScheduledRequest
from kvroute.replicas.executor_torch import TorchExecutor
from kvroute.replicas.factory import build_engine
from kvroute.replicas.model.attention import DenseAttention
from kvroute.replicas.request import SamplingParams

VOCAB = 96
BLOCK = 4
WINDOW = 7  # not a multiple of the block size: the window starts inside a block


def settings(
    *,
    hybrid: bool,
    num_blocks: int = 128,
    chunk: int = 256,
    max_num_seqs: int = 8,
    caching: bool = True,
    poison: bool = False,
    path: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
) -> ReplicaSettings:
    kv = {"num_kv_heads": 2, "head_size": 8, "dtype": dtype}
    groups = [GroupConfig(kind="full_attention", **kv)]  # type: ignore[arg-type]
    if hybrid:
        groups.append(GroupConfig(kind="sliding_window", sliding_window=WINDOW, **kv))  # type: ignore[arg-type]
    return ReplicaSettings(
        model=ModelConfig(
            name="test-hybrid" if hybrid else "test-full",
            block_size=BLOCK,
            num_blocks=num_blocks,
            vocab_size=VOCAB,
            max_model_len=256,
            groups=groups,
            num_layers=4 if hybrid else 2,
            hidden_size=32,
            num_heads=4,
            intermediate_size=64,
            path=path,
            tokenizer=tokenizer,
        ),
        hashing=HashingConfig(),
        replicas=ReplicasConfig(
            executor="torch",
            device="cpu",
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=chunk,
            enable_prefix_caching=caching,
            poison_free_blocks=poison,
        ),
        events=EventsConfig(),
    )


def engine(config: ReplicaSettings) -> Engine:
    return build_engine(config, VirtualClock(), events=False)


def executor(e: Engine) -> TorchExecutor:
    assert isinstance(e.executor, TorchExecutor)
    return e.executor


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


@dataclass
class Recorder:
    """Wraps the executor's forward: keeps each returned logits row with its
    request and position, for comparison with dense attention afterwards."""

    rows: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)

    def attach(self, e: Engine) -> None:
        ex = executor(e)
        forward: Callable[[Sequence[ScheduledRequest]], torch.Tensor] = ex.forward

        def recording(batch: Sequence[ScheduledRequest]) -> torch.Tensor:
            logits = forward(batch)
            sampled = [s for s in batch if s.sample]
            for s, row in zip(sampled, logits, strict=True):
                self.rows.append((s.request.request_id, s.num_computed + s.num_new - 1, row))
            return logits

        ex.forward = recording  # type: ignore[method-assign]


def run(e: Engine, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Step until idle; the finished outputs by request id."""
    finished: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not e.has_work:
            return finished
        for out in e.step().outputs:
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("engine did not go idle")


def dense_logits(
    e: Engine, token_ids: Sequence[int], kv_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The reference: the same weights over the whole sequence, no cache (K/V
    rounded to `kv_dtype` if given)."""
    ex = executor(e)
    ids = torch.tensor(token_ids)
    attend = DenseAttention(ex.arch, len(ids), torch.device("cpu"), kv_dtype)
    with torch.inference_mode():
        return ex.model(ids, torch.arange(len(ids)), attend)
