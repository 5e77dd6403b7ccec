"""The replica as a Ray actor: one engine, one event publisher.

It pushes its load on the event socket (every step that changed it, and a keepalive
every `LOAD_KEEPALIVE_S`), so the router's `load()` poll is only a slow correction.

Lifecycle: `start()` binds the event sockets, registers with the router (a
replica registers before it publishes), then starts the serving loop. The loop
itself (steps, request queues, publishing, aborts) is `replicas.serving.ReplicaCore`,
the same one `kvroute serve-replica` runs without Ray; this actor adds only the
registration and the Ray-facing methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch

from kvroute.events.curve import CurveKeyPair, CurveServerConfig
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    ReplicaInfo,
    ReplicaLoad,
    Snapshot,
    StreamChunk,
)
from kvroute.replicas.clock import RealClock
from kvroute.replicas.config import ReplicaSettings
from kvroute.replicas.data_server import DataServer
from kvroute.replicas.factory import build_engine
from kvroute.replicas.serving import ReplicaCore

logger = logging.getLogger(__name__)

# How often an idle replica pushes its unchanged load: well inside the router's
# `load_timeout_s` (2 s by default, and configs go down to 1 s), after which a
# replica heard from neither by push nor by poll is suspect.
LOAD_KEEPALIVE_S = 0.5


def _reachable(endpoint: str | None) -> str | None:
    """An endpoint bound on all interfaces, rewritten to this node's address so
    a router on another node can connect to it."""
    if endpoint is None or "://0.0.0.0:" not in endpoint:
        return endpoint
    return endpoint.replace("0.0.0.0", ray.util.get_node_ip_address(), 1)


class ReplicaServer:
    """Serves `generate` for many requests at once over one engine."""

    def __init__(
        self,
        replica_id: str,
        config: ReplicaSettings,
        router_name: str,
        rank: int = 0,
        router_public_key: str | None = None,
    ) -> None:
        if config.events.security == "curve" and router_public_key is None:
            raise ValueError("events.security is curve, but no router public key was given")
        self.replica_id = replica_id
        # This replica's own key pair: its secret never leaves the process.
        self._curve = (
            CurveServerConfig(CurveKeyPair.generate(), frozenset({router_public_key}))
            if router_public_key is not None
            else None
        )
        self.config = config
        self.router_name = router_name
        self.rank = rank
        if config.replicas.executor == "torch":
            # Replicas share the node's cores: each computes with its own few threads.
            torch.set_num_threads(config.replicas.threads)
        self.engine = build_engine(config, RealClock(), seed_offset=rank)
        self.core = ReplicaCore(
            replica_id,
            self.engine,
            tuple(config.model.lora_names),
            publish_token_ids=config.events.publish_token_ids,
            on_death=self._exit,
            step_in_thread=config.replicas.executor == "torch",
            load_keepalive_s=LOAD_KEEPALIVE_S,
        )
        self._starting: asyncio.Future[ReplicaInfo] | None = None
        self._publisher: ZmqEventPublisher | None = None
        self._data: DataServer | None = None
        self._ipc_dir: str | None = None
        self._load_calls = 0  # load() calls answered: what polling costs this replica

    def _endpoints(self) -> tuple[str, str, str]:
        """Events, replay and data endpoints: all on the events' transport and host."""
        events = self.config.events
        if events.transport == "ipc":
            self._ipc_dir = tempfile.mkdtemp(prefix=f"kvroute-{self.replica_id}-")
            base = f"ipc://{self._ipc_dir}"
            return f"{base}/pub", f"{base}/replay", f"{base}/data"
        return (f"tcp://{events.host}:*",) * 3

    async def start(self) -> ReplicaInfo:
        """Bind, register with the router, then start serving and publishing.

        Idempotent, and concurrent calls (the launcher's and a router's supervisor)
        all wait for the one start to finish: none returns before the replica serves.
        """
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> ReplicaInfo:
        pub, replay, data = self._endpoints()
        events = self.config.events
        self._publisher = ZmqEventPublisher(
            PublisherConfig(
                endpoint=pub,
                replay_endpoint=replay,
                hwm=events.hwm,
                buffer_steps=events.buffer_steps,
                max_queue_size=events.max_queue_size,
                curve=self._curve,
                max_replays_per_s=events.max_replays_per_s,
            )
        )
        self._data = DataServer(self.core, data, self._curve)
        info = self.info()
        router = ray.get_actor(self.router_name, namespace=self.config.namespace)
        await router.register_replica.remote(info)
        self.core.start(self._publisher)
        self._data.start()
        return info

    def info(self) -> ReplicaInfo:
        assert self._publisher is not None, "start() binds the endpoints first"
        cfg = self.config
        manager = self.engine.kv_cache
        context = ray.get_runtime_context()
        return ReplicaInfo(
            replica_id=self.replica_id,
            actor_name=self.replica_id,
            namespace=cfg.namespace,
            node_id=context.get_node_id(),
            kv_cache_config=manager.kv_cache_config,
            hash_block_size=cfg.model.hash_block_size,
            scheduler_block_size=manager.coordinator.scheduler_block_size,
            use_eagle=cfg.model.use_eagle,
            hash_algo=cfg.hashing.algo,
            hash_seed=cfg.hashing.seed,
            retention_interval=cfg.replicas.retention_interval,
            limits=self.engine.limits,
            event_endpoint=_reachable(self._publisher.endpoint),
            replay_endpoint=_reachable(self._publisher.replay_endpoint),
            data_parallel_rank=self.rank,
            curve_public_key=self._curve.keys.public_key if self._curve else None,
            data_endpoint=_reachable(self._data.endpoint) if self._data else None,
        )

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self.core.generate(request)

    async def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        """Call with num_returns="streaming": a StreamChunk per step that produced
        tokens (the last one included), then the GenerateResult."""
        items = self.core.generate_stream(request)
        async with contextlib.aclosing(items):
            async for item in items:
                yield item

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks (see `ReplicaCore.abort`)."""
        return self.core.abort(request_id)

    async def snapshot(self) -> Snapshot:
        """Every cached block as one batch, valid up to the publisher's next seq."""
        assert self._publisher is not None
        return await self.core.snapshot()

    def load(self) -> ReplicaLoad:
        self._load_calls += 1
        return self.core.load()

    def health(self) -> dict[str, Any]:
        stats = self._publisher.stats if self._publisher else None
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "steps": self.core.steps,
            "in_flight": self.core.in_flight,
            "events_published": stats.published if stats else 0,
            "events_dropped": stats.dropped_queue_full if stats else 0,
            "load_calls": self._load_calls,
            "loads_pushed": self.core.loads_pushed,
            "data_streaming": self._data.streaming if self._data else 0,
            "data_malformed": self._data.malformed if self._data else 0,
        }

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache and publish AllBlocksCleared at once, so the router
        knows before the next request; refused (False) while blocks are in use."""
        return self.core.reset_prefix_cache()

    def _exit(self) -> None:
        """The engine loop died (logged by the core): exit the process, so Ray
        restarts the actor (`replicas.max_restarts`) and callers, the router's load
        poll included, see it gone at once and route around it. An exit by
        `ray.actor.exit_actor` would be taken as intended and not restarted."""
        logger.error("replica %s exits so that Ray restarts it", self.replica_id)
        os._exit(1)

    def shutdown(self) -> None:
        self.core.cancel()
        if self._data is not None:
            self._data.close()
        if self._publisher is not None:  # bound, even if registering failed
            self._publisher.close()
