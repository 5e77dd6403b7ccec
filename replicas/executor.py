"""Model executors: run one engine step and produce its tokens.

`SimulatedExecutor`: a cost model instead of a GPU, and pseudo-random output
tokens that depend only on (seed, request id, position), so a run is
reproducible and independent of batching; its step duration is virtual time
the caller must let pass. `replicas.executor_torch.TorchExecutor` runs a real
model; its duration is compute time already spent (`measures_time`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvroute.replicas.request import Request


@dataclass(frozen=True)
class StepShape:
    """What one engine step computes."""

    prefill_tokens: int
    decode_seqs: int
    kv_blocks_read: int


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed, num_computed + num_new)
    of `request.all_token_ids`; `sample` when they end its known tokens."""

    request: Request
    num_computed: int
    num_new: int
    sample: bool


@dataclass(frozen=True)
class StepOutput:
    duration: float
    token_ids: dict[str, int]  # request id -> sampled token, for requests with `sample`
    # Requests whose own part of the step failed (their sampling), with the error:
    # the step's other tokens stand.
    failed: dict[str, Exception] = field(default_factory=dict)


@dataclass(frozen=True)
class CostModel:
    """Step time = base + prefill tokens / speed + per decode sequence + per KV block read.

    Defaults: about one GPU serving a 30B-class model (10,000 prefill tokens/s).
    """

    prefill_tokens_per_s: float = 10_000.0
    step_base_s: float = 0.004
    decode_s_per_seq: float = 0.0002
    kv_read_s_per_block: float = 0.000002

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be positive")
        if min(self.step_base_s, self.decode_s_per_seq, self.kv_read_s_per_block) < 0:
            raise ValueError("step costs must be non-negative")

    def step_time(self, shape: StepShape) -> float:
        if shape.prefill_tokens == 0 and shape.decode_seqs == 0:
            return 0.0
        return (
            self.step_base_s
            + shape.prefill_tokens / self.prefill_tokens_per_s
            + shape.decode_seqs * self.decode_s_per_seq
            + shape.kv_blocks_read * self.kv_read_s_per_block
        )


class Executor(Protocol):
    """Runs steps. `execute` either returns, reporting in `StepOutput.failed` any
    request whose own part failed, or raises before drawing any token, so the
    engine may run the same step again (request by request) and get the tokens a
    step that never failed would have drawn. Rerunning a step rewrites the same
    KV slots with the same values."""

    # True: `duration` is wall time the step already took (never sleep it again).
    # False: virtual time that the caller lets pass (sleeps it, or jumps over it).
    measures_time: bool

    def execute(self, batch: Sequence[ScheduledRequest], shape: StepShape) -> StepOutput: ...

    def forget(self, request_id: str) -> None: ...


class SimulatedExecutor:
    """Cost-model timing and deterministic tokens in [0, vocab_size)."""

    measures_time = False

    def __init__(self, cost: CostModel, vocab_size: int, seed: int = 0) -> None:
        if vocab_size <= 0:
            raise ValueError("vocab_size must be positive")
        self.cost = cost
        self.vocab_size = vocab_size
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def execute(self, batch: Sequence[ScheduledRequest], shape: StepShape) -> StepOutput:
        tokens = {
            s.request.request_id: self.sample(s.request.request_id, s.request.num_output_tokens)
            for s in batch
            if s.sample
        }
        return StepOutput(self.step_time(shape), tokens)

    def step_time(self, shape: StepShape) -> float:
        return self.cost.step_time(shape)

    def sample(self, request_id: str, position: int) -> int:
        """The token at output `position` of `request_id`; calls must come in order."""
        stream = self._streams.get(request_id)
        if stream is None or position == 0:
            stream = random.Random(f"{self.seed}:{request_id}")
            self._streams[request_id] = stream
        return stream.randrange(self.vocab_size)

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
