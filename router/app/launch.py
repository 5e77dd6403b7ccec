"""Bring a cluster up from a config: Ray, the router actor, the replica actors.

Order matters: the router starts first (discovery, HTTP), then each replica
binds its event sockets and registers with the router before it publishes.
A config with only external engines and one router runs without Ray: the router
is an `InProcessRouter` (`router/app/in_process.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import ray
import ray._private.ray_constants as ray_constants

from kvroute.events.curve import CurveKeyPair, read_key_pair
from kvroute.replicas.actor import ReplicaServer
from kvroute.router.app.in_process import InProcessRouter
from kvroute.router.app.logs import DEFAULT_LOG_LEVEL, ray_runtime_env
from kvroute.router.config import Config
from kvroute.router.service.router_service import (
    ROUTER_NAME,
    RouterService,
    replica_actor_name,
    router_actor_name,
)

logger = logging.getLogger(__name__)


class RouterHandle(Protocol):
    """A running router, wherever it runs: `call` runs one `RouterService` method."""

    def call(self, method: str, *args: Any, timeout_s: float = ...) -> Any: ...

    def stop(self) -> None: ...


class RayRouter:
    """A router actor, through its handle (`actor`)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def call(self, method: str, *args: Any, timeout_s: float = 120.0) -> Any:
        return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout_s)

    def stop(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            logger.debug("router actor already gone", exc_info=True)


@dataclass
class Cluster:
    config: Config
    routers: list[RouterHandle]
    replicas: list[Any]
    urls: list[str]
    owns_ray: bool

    @property
    def router(self) -> RouterHandle:
        """The first router: the one replicas register with."""
        return self.routers[0]

    @property
    def url(self) -> str | None:
        return self.urls[0] if self.urls else None

    def stop(self) -> None:
        """Stop the routers, then the replica actors (and Ray, if this process started
        it): routers first, so none sees its replicas leave and warns of it."""
        for router in self.routers:
            router.stop()
        for replica in self.replicas:
            try:
                ray.kill(replica, no_restart=True)
            except Exception:
                logger.debug("replica actor already gone", exc_info=True)
        if self.owns_ray:
            ray.shutdown()


def needs_ray(config: Config) -> bool:
    """Ray runs kvroute's own replicas, a router tier and multi-node deployments; one
    router in front of external engines only needs none of it."""
    return bool(config.replicas.count or config.router.count > 1 or config.cluster.address)


def init_ray(config: Config, log_level: str = DEFAULT_LOG_LEVEL) -> bool:
    """Connect to `cluster.address`, or start an embedded local Ray. True if started here.

    Workers log at `log_level`, and their lines are shown in this process's terminal.
    """
    if ray.is_initialized():
        return False
    cluster = config.cluster
    common: dict[str, Any] = {
        "namespace": cluster.namespace,
        "log_to_driver": True,
        "runtime_env": ray_runtime_env(log_level),
    }
    if cluster.address:
        ray.init(address=cluster.address, **common)
    else:
        # "local": always a new Ray of our own, never one that happens to run here,
        # and on loopback only. Ray binds every server (GCS, raylet, workers, agents)
        # to 127.0.0.1 iff the node address is loopback, but on Linux it rewrites a
        # loopback address to the host's routable one unless its single-host mode
        # (the macOS/Windows default) is on; no public switch exists.
        # tests/cluster/test_loopback.py lists the listening sockets to prove it.
        saved = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False, **common)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    return True


def cluster_keys(config: Config) -> CurveKeyPair | None:
    """The routers' CURVE key pair for a new cluster (None with events.security: none):
    `router.curve_key_file`'s, which external engines can be told to admit, else a
    fresh one. It reaches routers and replicas only as an actor argument, through Ray."""
    if config.events.security != "curve":
        return None
    if config.router.curve_key_file is not None:
        return read_key_pair(config.router.curve_key_file)
    return CurveKeyPair.generate()


def start_router(
    config: Config,
    http: bool = True,
    name: str = ROUTER_NAME,
    curve: CurveKeyPair | None = None,
) -> tuple[Any, str | None]:
    """A router actor; a router not named `ROUTER_NAME` is an extra one, which finds
    the running replicas by name and follows their event streams like the first
    (with the same `curve` key pair, which the replicas accept)."""
    actor = ray.remote(RouterService).options(
        name=name,
        namespace=config.cluster.namespace,
        max_restarts=-1,
        max_concurrency=10_000,
        num_cpus=0,
    )
    router = actor.remote(
        config, serve_http=http, curve=curve, api_keys=config.router.api_keys(), name=name
    )
    return router, ray.get(router.ready.remote())


def start_replica(
    config: Config, index: int, router_public_key: str | None = None, **options: Any
) -> Any:
    actor = ray.remote(ReplicaServer).options(
        name=replica_actor_name(index),
        namespace=config.cluster.namespace,
        max_concurrency=10_000,
        num_cpus=config.replicas.num_cpus,
        max_restarts=config.replicas.max_restarts,
        **options,
    )
    handle = actor.remote(
        replica_actor_name(index), config.replica_settings(), ROUTER_NAME, index, router_public_key
    )
    ray.get(handle.start.remote())
    return handle


def start_cluster(config: Config, http: bool = True, log_level: str = DEFAULT_LOG_LEVEL) -> Cluster:
    keys = cluster_keys(config)
    if not needs_ray(config):
        local = InProcessRouter(config, keys, http)
        return Cluster(config, [local], [], [local.url] if local.url else [], owns_ray=False)
    owns_ray = init_ray(config, log_level)
    router, url = start_router(config, http, curve=keys)
    public = keys.public_key if keys is not None else None
    replicas = [start_replica(config, i, public) for i in range(config.replicas.count)]
    routers: list[RouterHandle] = [RayRouter(router)]
    urls = [url] if url else []
    for i in range(1, config.router.count):
        extra, extra_url = start_router(
            _router_port(config, i), http, name=router_actor_name(i), curve=keys
        )
        routers.append(RayRouter(extra))
        urls.extend([extra_url] if extra_url else [])
    return Cluster(config, routers, replicas, urls, owns_ray)


def _router_port(config: Config, i: int) -> Config:
    """Router i's config: its own HTTP port (a free one when the base is 0)."""
    port = config.router.http_port
    router = msgspec.structs.replace(config.router, http_port=port + i if port else 0)
    return msgspec.structs.replace(config, router=router)
