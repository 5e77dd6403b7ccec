"""One Ray cluster of two nodes for the whole session, and one kvroute
deployment on it launched from configs/default.yaml (odd replicas pinned to
the second node). Ray tests are few and share this: each Ray start costs ~10 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvroute.events.curve import CurveKeyPair
from kvroute.router.app.client import KVRouteClient
from kvroute.router.app.launch import cluster_keys, start_replica, start_router
from kvroute.router.config import Config, load_config

CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


@dataclass
class Deployment:
    config: Config
    router: Any
    replicas: list[Any]
    nodes: list[str]
    keys: CurveKeyPair

    @property
    def url(self) -> str:
        return ray.get(self.router.ready.remote())

    def client(self) -> KVRouteClient:
        return KVRouteClient(self.url)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, namespace="kvroute", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def deployment(ray_cluster: Cluster) -> Deployment:
    config = load_config(CONFIG_PATH)
    config = msgspec.structs.replace(
        config, router=msgspec.structs.replace(config.router, http_port=0)
    )
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    head = ray.get_runtime_context().get_node_id()
    worker = next(n for n in nodes if n != head)
    keys = cluster_keys(config)
    assert keys is not None, "the default config encrypts the event plane"
    router, _ = start_router(config, curve=keys)
    replicas = [
        start_replica(
            config,
            i,
            keys.public_key,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                worker if i % 2 else head, soft=False
            ),
        )
        for i in range(config.replicas.count)
    ]
    return Deployment(config, router, replicas, [head, worker], keys)
