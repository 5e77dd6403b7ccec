"""How the router reaches an engine: one interface, a transport per kind of engine.

The service routes with the core and then calls a `EngineBackend`; it never knows
whether the engine is one of kvroute's Ray actors (`RayReplica`) or an external
server reached over HTTP (`HttpEngine`, built by its engine kind).

Contract, for every backend:
- `generate_stream` yields a `StreamChunk` per engine step and ends with the
  `GenerateResult`. Closing it early leaves the engine to `abort`.
- `ReplicaUnavailableError` means the engine could not take or finish the
  request for a reason of its own (it died, refused the connection, answered
  5xx): the service may retry elsewhere if nothing was streamed yet.
- `InvalidRequestError` means the request is at fault: no retry.
- `snapshot` returns None when the engine cannot give one: its entries are then
  dropped and rebuilt from the events that follow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvroute.replicas.api import GenerateRequest, GenerateResult, ReplicaLoad, Snapshot, StreamChunk


class ReplicaUnavailableError(RuntimeError):
    """The engine cannot serve: it is gone, unreachable or failing."""


class EngineBackend(Protocol):
    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]: ...

    def abort(self, request_id: str) -> None: ...

    async def load(self) -> ReplicaLoad: ...

    async def snapshot(self) -> Snapshot | None: ...

    async def reset_prefix_cache(self) -> bool: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...
