"""External engines (the config's `external:` list): admission, health and refusal.

The service owns the routed replicas; this object decides which external engines
join or leave them and calls back into the service to do it.

Invariants:
- An engine is admitted only once its `/health` answers 200, and never while it is
  routed or refused.
- A refused engine (its events contradict its configured layout) stays out until
  the router restarts; `refused` says why.
- Every engine shares one bounded connection pool, made on first use and closed by
  `close()`; idle connections in it are closed before the engines close them.
- Dropping an engine is the last resort: a failed request or health check makes it
  failing (routed around, its index kept) at once; it leaves routing and the index
  only after failing for `engine_failure_window_s` with no success between, and
  that log line names the last error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import aiohttp

from kvroute.events.kv_events import DEFAULT_LIMITS, DecodeLimits
from kvroute.events.source import SourceSpec
from kvroute.replicas.api import ModelLimits
from kvroute.replicas.kv_cache.coordinator import default_scheduler_block_size
from kvroute.router.config import Config, ExternalEngineConfig
from kvroute.router.core import Registration, Router
from kvroute.router.engines.backends import EngineBackend
from kvroute.router.engines.kind import EngineAddress
from kvroute.router.engines.link import ReplicaLink
from kvroute.router.engines.registry import external_kind

logger = logging.getLogger(__name__)

Admit = Callable[[Registration, EngineBackend, SourceSpec, str | None], None]


def external_registration(engine: ExternalEngineConfig, config: Config) -> Registration:
    """An external engine's registration, from its configured layout and kind."""
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
        hit_rule=external_kind(engine.kind).hit_rule,
        hash_dialect=engine.hash_dialect,
    )


def external_source(
    engine: ExternalEngineConfig, limits: DecodeLimits = DEFAULT_LIMITS
) -> SourceSpec:
    """An external engine's event stream, read by its kind's decoder: caught up from
    its replay buffer (what it cached before the router joined) where it has one,
    then followed live."""
    events = engine.events
    return SourceSpec(
        name=engine.name,
        endpoint=events.endpoint,
        replay_endpoint=events.replay_endpoint,
        topic=events.topic,
        start_seq=None,
        catch_up=True,
        curve_server_key=events.curve_public_key(),
        decoder=external_kind(engine.kind).decoder(limits),
    )


class ExternalEngines:
    """Admits, health-checks and refuses the configured external engines.

    `routed` is the service's live map of routed replicas (read only here); `admit`
    indexes and routes to an engine (ValueError on a hash mismatch); `remove` takes
    one out of routing and the index. Every engine's kind is checked here: an unknown
    kind, or one not reached by URL, is a ValueError naming it."""

    def __init__(
        self,
        config: Config,
        model_name: str,
        routed: Mapping[str, ReplicaLink],
        admit: Admit,
        remove: Callable[[str], None],
        core: Router,
    ) -> None:
        for engine in config.external:
            try:
                external_kind(engine.kind)
            except ValueError as exc:
                raise ValueError(f"external engine {engine.name!r}: {exc}") from None
        self.config = config
        self.model_name = model_name
        self.routed = routed
        self._admit = admit
        self._remove = remove
        self.core = core
        # Failing engines: since when (monotonic), and the last error.
        self.failing: dict[str, tuple[float, str]] = {}
        # External engines refused for events that contradict their layout, and why.
        self.refused: dict[str, str] = {}
        # One bounded connection pool for every external engine, made on first use.
        self._session: aiohttp.ClientSession | None = None

    def _engine_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            router = self.config.router
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=router.max_engine_connections,
                    keepalive_timeout=router.engine_keepalive_s,
                ),
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
            address = EngineAddress(
                engine.name, engine.url, self.model_name, self._engine_session()
            )
            backend = external_kind(engine.kind).backend(address)
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
                self.failing.pop(engine.name, None)
            except ValueError as exc:
                logger.error("engine %s refused: %s", engine.name, exc)
                continue
            logger.info("routing to external engine %s at %s", engine.name, engine.url)

    async def check_health(self, working: Callable[[str], bool] = lambda _: False) -> None:
        """An external engine whose `/health` answers other than 200 (vLLM answers 503
        once its engine core died), or refuses the connection, is failing (see
        `failed`); one that answers 200 has recovered. A slow answer is neither:
        the load poll routes around a slow engine. An engine not failing that
        `working` says is streaming is not asked: its tokens prove more than a 200
        does, and each probe costs both ends a request."""
        engines = [
            (rid, link.backend)
            for rid, link in self.routed.items()
            if link.external and (rid in self.failing or not working(rid))
        ]
        timeout = self.config.router.load_timeout_s
        for rid, engine in engines:
            try:
                healthy = await asyncio.wait_for(engine.healthy(), timeout)
            except TimeoutError:
                continue
            if healthy:
                self.succeeded(rid)
            else:
                self.failed(rid, "its /health did not answer 200")

    def failed(self, replica_id: str, error: str) -> None:
        """A request or health check of `replica_id` failed with `error`: routed
        around from now; removed once it has failed for `engine_failure_window_s`."""
        now = time.monotonic()
        since, _ = self.failing.get(replica_id, (now, error))
        self.failing[replica_id] = (since, error)
        self.core.mark_failing(replica_id, True)
        window = self.config.router.engine_failure_window_s
        if since == now:
            logger.warning("engine %s failed (%s): routing around it", replica_id, error)
        elif now - since >= window:
            logger.error(
                "engine %s has failed for %.0f s (last: %s): removing it from routing "
                "and the index",
                replica_id,
                now - since,
                error,
            )
            del self.failing[replica_id]
            self._remove(replica_id)

    def succeeded(self, replica_id: str) -> None:
        """A request or health check of `replica_id` succeeded: it is routed again."""
        if self.failing.pop(replica_id, None) is not None:
            self.core.mark_failing(replica_id, False)
            logger.info("engine %s answers again: routing to it", replica_id)

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
