"""External engines (the config's `external:` list): admission, health and refusal.

The service owns the routed replicas; this object decides which external engines
join or leave them and calls back into the service to do it.

Invariants:
- An engine is admitted only once its `/health` answers 200, and never while it is
  routed or refused.
- A refused engine (its events contradict its configured layout) stays out until
  the router restarts; `refused` says why.
- Every engine shares one bounded connection pool, made on first use and closed by
  `close()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import aiohttp

from kvroute.events.source import SourceSpec
from kvroute.replicas.api import ModelLimits
from kvroute.replicas.kv_cache.coordinator import default_scheduler_block_size
from kvroute.router.config import Config, ExternalEngineConfig
from kvroute.router.core import Registration
from kvroute.router.engines.backends import Backend
from kvroute.router.engines.http_engine import HttpEngine
from kvroute.router.engines.link import ReplicaLink

logger = logging.getLogger(__name__)

Admit = Callable[[Registration, Backend, SourceSpec, str | None], None]


def external_registration(engine: ExternalEngineConfig, config: Config) -> Registration:
    """An external engine's registration, from its configured layout."""
    layout = engine.layout or config.model
    seeded = engine.hash_mode == "seeded"
    kv_cache_config = layout.kv_cache_config()
    return Registration(
        replica_id=engine.name,
        kv_cache_config=kv_cache_config,
        hash_block_size=layout.hash_block_size,
        scheduler_block_size=default_scheduler_block_size(kv_cache_config),
        use_eagle=layout.use_eagle,
        hash_algo=config.hashing.algo,
        hash_seed=(engine.hash_seed or "") if seeded else config.hashing.seed,
        limits=ModelLimits(layout.max_model_len, layout.vocab_size, tuple(layout.lora_names)),
        hash_mode=engine.hash_mode,
        hash_dialect=engine.hash_dialect,
    )


def external_source(engine: ExternalEngineConfig) -> SourceSpec:
    """An external engine's event stream, caught up from its replay buffer (what it
    cached before the router joined) where it has one, then followed live."""
    events = engine.events
    return SourceSpec(
        name=engine.name,
        endpoint=events.endpoint,
        replay_endpoint=events.replay_endpoint,
        topic=events.topic,
        start_seq=None,
        catch_up=True,
        curve_server_key=events.curve_public_key(),
    )


class ExternalEngines:
    """Admits, health-checks and refuses the configured external engines.

    `routed` is the service's live map of routed replicas (read only here); `admit`
    indexes and routes to an engine (ValueError on a hash mismatch); `remove` takes
    one out of routing and the index."""

    def __init__(
        self,
        config: Config,
        model_name: str,
        routed: Mapping[str, ReplicaLink],
        admit: Admit,
        remove: Callable[[str], None],
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.routed = routed
        self._admit = admit
        self._remove = remove
        # External engines refused for events that contradict their layout, and why.
        self.refused: dict[str, str] = {}
        # One bounded connection pool for every external engine, made on first use.
        self._session: aiohttp.ClientSession | None = None

    def _engine_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            router = self.config.router
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=router.max_engine_connections),
                timeout=aiohttp.ClientTimeout(total=None, connect=router.engine_connect_timeout_s),
            )
        return self._session

    async def discover(self) -> None:
        """Admit every configured external engine that answers `/health` and is not
        routed to yet: at boot, and again after it failed and came back. Its entries
        start from what its replay buffer still holds, then follow its stream."""
        for engine in self.config.external:
            if engine.name in self.routed or engine.name in self.refused:
                continue
            backend = HttpEngine(engine.name, engine.url, self.model_name, self._engine_session())
            try:
                healthy = await asyncio.wait_for(
                    backend.healthy(), self.config.router.load_timeout_s
                )
            except TimeoutError:
                healthy = False
            if not healthy:
                continue
            try:
                registration = external_registration(engine, self.config)
                self._admit(registration, backend, external_source(engine), None)
            except ValueError as exc:
                logger.error("engine %s refused: %s", engine.name, exc)
                continue
            logger.info("routing to external engine %s at %s", engine.name, engine.url)

    async def check_health(self) -> None:
        """An external engine whose `/health` answers other than 200 (vLLM answers 503
        once its engine core died), or refuses the connection, leaves routing and the
        index; discovery admits it again, empty, when it is healthy."""
        engines = [
            (rid, link.backend)
            for rid, link in self.routed.items()
            if isinstance(link.backend, HttpEngine)
        ]
        timeout = self.config.router.load_timeout_s
        for rid, engine in engines:
            try:
                healthy = await asyncio.wait_for(engine.healthy(), timeout)
            except TimeoutError:
                continue  # slow, not failed: the load poll routes around it
            if not healthy:
                logger.warning("engine %s failed its health check", rid)
                self._remove(rid)

    def refuse(self, replica_id: str, registration: Registration, why: str = "") -> None:
        """An external engine whose events contradict its configured layout (or, given
        `why`, its hash settings) would be mispredicted: it leaves routing and is not
        admitted again until the router restarts (with its config fixed)."""
        groups = registration.kv_cache_config.kv_cache_groups
        layout = ", ".join(
            f"group {i}: {g.kv_cache_spec.kind.value} of block size {g.kv_cache_spec.block_size}"
            for i, g in enumerate(groups)
        )
        reason = why or (
            f"its KV events do not match its configured layout ({layout}): an unknown group, "
            "or another kind or block size"
        )
        logger.error("engine %s refused: %s", replica_id, reason)
        self.refused[replica_id] = reason
        self._remove(replica_id)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
