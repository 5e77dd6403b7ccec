"""kvroute's own replicas as an engine kind: Ray actors, reached through their handles.

The service builds their `RayReplica` backend from the actor handle when a replica
registers, so this kind has no URL backend and no HTTP dialect. Their events are vLLM's
wire format and their block manager follows vLLM's hit rule.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from kvroute.events.kv_events import KVEventDecoder
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
from kvroute.router.engines.backends import ReplicaUnavailableError
from kvroute.router.engines.kind import EngineKind
from kvroute.router.index.hit_rules import VLLM_HIT_RULE

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

    async def healthy(self) -> bool:
        """Does the actor answer? Asked of every backend alike; Ray restarts a dead
        actor and the service's supervision re-admits it."""
        try:
            await self.handle.load.remote()
        except ACTOR_GONE:
            return False
        return True

    async def close(self) -> None:
        """Nothing to release: Ray owns the handle."""


KIND = EngineKind(name="kvroute", decoder=KVEventDecoder, hit_rule=VLLM_HIT_RULE)
