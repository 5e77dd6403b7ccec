"""Every engine kind the router can front, by the name a config gives it.

Adding a kind: write its module (an `EngineKind` named `KIND`) and add it below.
"""

from __future__ import annotations

from kvroute.router.engines import ray_replica, vllm
from kvroute.router.engines.kind import EngineKind

ENGINE_KINDS: dict[str, EngineKind] = {kind.name: kind for kind in (vllm.KIND, ray_replica.KIND)}


def engine_kind(name: str) -> EngineKind:
    """The kind called `name`; ValueError naming the known kinds otherwise."""
    kind = ENGINE_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown engine kind {name!r}; known kinds: {sorted(ENGINE_KINDS)}")
    return kind


def external_kind(name: str) -> EngineKind:
    """The kind of an engine reached by URL; ValueError if `name` is unknown or has no
    URL backend."""
    kind = engine_kind(name)
    if kind.backend is None or kind.dialect is None:
        reachable = sorted(k.name for k in ENGINE_KINDS.values() if k.backend is not None)
        raise ValueError(
            f"engine kind {name!r} is not reached by URL; external engines may be {reachable}"
        )
    return kind
