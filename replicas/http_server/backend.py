"""What a replica's vLLM-shaped HTTP face stands on: the engine and the model it serves.

Shared by the generation (`replica_generation`), the response shapes
(`replica_responses`), the metrics (`replica_metrics`) and the app (`replica_http`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    ModelLimits,
    ReplicaCounters,
    ReplicaLoad,
    StreamChunk,
)


class ServedEngine(Protocol):
    """What the HTTP face needs from the engine behind it."""

    @property
    def serving(self) -> bool: ...

    def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]: ...

    def load(self) -> ReplicaLoad: ...

    def counters(self) -> ReplicaCounters: ...

    def reset_prefix_cache(self) -> bool: ...


@dataclass(frozen=True)
class ServedModel:
    """The model this server answers for, and how it answers."""

    name: str  # the served model name (`model` in requests and responses)
    root: str  # the checkpoint directory, or the name for random weights
    limits: ModelLimits
    eos_token_ids: tuple[int, ...] = ()
    engine_index: int = 0  # vLLM's `engine` metric label: the data-parallel rank
    enable_prompt_tokens_details: bool = True
    max_body_bytes: int = 4 * 1024 * 1024
