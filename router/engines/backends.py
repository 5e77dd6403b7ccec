"""How the router reaches an engine: one interface, a transport per kind of engine.

The service routes with the core and then calls a `Backend`; it never knows
whether the engine is one of kvroute's Ray actors (`RayReplica`) or an external
server reached over HTTP (`router.engine_client.HttpEngine`).

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
from typing import Any, Protocol

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from kvroute.replicas.api import (
    EngineDeadError,
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ReplicaLoad,
    RequestFailedError,
    Snapshot,
    StreamChunk,
)

ACTOR_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


def _replica_error(exc: RayTaskError) -> Exception:
    """What a replica raised, as the router answers it: its own exception (its
    message, not Ray's traceback) for a refused or failed request; a stopped
    engine is an unavailable replica."""
    cause = exc.cause
    if isinstance(cause, EngineDeadError):
        return ReplicaUnavailableError(str(cause))
    if isinstance(cause, InvalidRequestError | RequestFailedError):
        return cause
    return exc


class ReplicaUnavailableError(RuntimeError):
    """The engine cannot serve: it is gone, unreachable or failing."""


class Backend(Protocol):
    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]: ...

    def abort(self, request_id: str) -> None: ...

    async def load(self) -> ReplicaLoad: ...

    async def snapshot(self) -> Snapshot | None: ...

    async def reset_prefix_cache(self) -> bool: ...

    async def close(self) -> None: ...


class RayReplica:
    """A kvroute replica actor, through its Ray handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        try:
            return await self.handle.generate.remote(request)
        except ACTOR_GONE as exc:
            raise ReplicaUnavailableError(str(exc)) from None
        except RayTaskError as exc:
            raise _replica_error(exc) from None

    async def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        try:
            items = self.handle.generate_stream.options(num_returns="streaming").remote(request)
            async for ref in items:
                yield await ref
        except ACTOR_GONE as exc:
            raise ReplicaUnavailableError(str(exc)) from None
        except RayTaskError as exc:
            raise _replica_error(exc) from None

    def abort(self, request_id: str) -> None:
        self.handle.abort.remote(request_id)

    async def load(self) -> ReplicaLoad:
        try:
            return await self.handle.load.remote()
        except ACTOR_GONE as exc:
            raise ReplicaUnavailableError(str(exc)) from None

    async def snapshot(self) -> Snapshot | None:
        try:
            return await self.handle.snapshot.remote()
        except ACTOR_GONE as exc:
            raise ReplicaUnavailableError(str(exc)) from None

    async def reset_prefix_cache(self) -> bool:
        try:
            return await self.handle.reset_prefix_cache.remote()
        except ACTOR_GONE as exc:
            raise ReplicaUnavailableError(str(exc)) from None

    async def close(self) -> None:
        """Nothing to release: Ray owns the handle."""
