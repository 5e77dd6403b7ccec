"""What makes one kind of engine: how to reach it, speak to it, read its events and
predict its hits.

An `EngineKind` gathers the four things the router does differently per engine kind,
so adding a kind is one module that defines its `EngineKind` and one line in
`router/engines/registry.py`:
- `backend`: builds the `EngineBackend` for an engine of this kind reached at a URL (None for
  kinds the router does not reach by URL, such as kvroute's own Ray replicas);
- `dialect`: the HTTP request and load-metrics shapes the backend speaks (None for a
  kind reached otherwise);
- `decoder`: reads the engine's published KV event payloads into `KVEventBatch`es;
- `hit_rule`: how its cached blocks become a prompt's computed tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from kvroute.events.kv_events import DecodeLimits, EventDecoder
from kvroute.replicas.api import GenerateRequest
from kvroute.router.index.hit_rules import HitRule

if TYPE_CHECKING:
    from kvroute.router.engines.backends import EngineBackend


class RequestDialect(Protocol):
    """How a kind of HTTP engine is asked to generate, and how it reports its load.

    `completion_path` takes a streamed completion whose SSE events are OpenAI's
    completion chunks with the output's `token_ids`; `load_metrics` maps Prometheus
    sample names on `/metrics` to `ReplicaLoad` fields."""

    completion_path: str
    load_metrics: Mapping[str, str]

    def completion_body(self, request: GenerateRequest, model: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EngineAddress:
    """Where an engine of some kind is reached: its name, base URL, the model it serves
    and the router's shared connection pool."""

    name: str
    url: str
    model: str
    session: aiohttp.ClientSession


@dataclass(frozen=True)
class EngineKind:
    name: str
    decoder: Callable[[DecodeLimits], EventDecoder]
    hit_rule: HitRule
    backend: Callable[[EngineAddress], EngineBackend] | None = None
    dialect: RequestDialect | None = None
