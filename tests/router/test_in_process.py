"""A router in front of external engines only runs in this process, without Ray, and
serves, predicts and stops like the Ray actor would."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import ray
import yaml

from kvroute.router.app.client import KVRouteClient
from kvroute.router.app.in_process import InProcessRouter
from kvroute.router.app.launch import needs_ray, start_cluster
from kvroute.router.config import parse_config
from tests.replicas.serve_helpers import events_json, serve_replica, tiny_config
from tests.replicas.test_serve_replica import free_port

pytestmark = pytest.mark.timeout(120)


def _external_only(url: str, events_port: int, model: dict | None = None) -> dict:
    """One router in front of one engine serving `model` (the engine's config section)."""
    engine = {
        "name": "engine-a",
        "url": url,
        "events": {"endpoint": f"tcp://127.0.0.1:{events_port}", "topic": "kv"},
    }
    config = {"replicas": {"count": 0}, "router": {"http_port": 0}, "external": [engine]}
    return {**config, "model": model} if model is not None else config


def test_only_replicas_a_router_tier_or_a_cluster_address_need_ray() -> None:
    external = _external_only("http://127.0.0.1:9", 9)
    assert needs_ray(parse_config(external)) is False
    assert needs_ray(parse_config({**external, "replicas": {"count": 1}})) is True
    assert needs_ray(parse_config({**external, "router": {"count": 2}})) is True
    assert needs_ray(parse_config({**external, "cluster": {"address": "auto"}})) is True


def test_an_external_only_router_serves_without_ray_and_stops_cleanly(tmp_path: Path) -> None:
    events_port = free_port()
    engine_config = tiny_config(tmp_path)
    model = yaml.safe_load(engine_config.read_text())["model"]
    with serve_replica(engine_config, events_json(events_port)) as server:
        config = parse_config(_external_only(server.url, events_port, model))
        ray_before = ray.is_initialized()  # another test's Ray may already run here
        cluster = start_cluster(config)
        try:
            assert isinstance(cluster.router, InProcessRouter)
            assert (cluster.owns_ray, cluster.replicas, ray.is_initialized()) == (
                False,
                [],
                ray_before,
            )
            assert cluster.router.call("wait_for_replicas", 1) == ["engine-a"]
            client = KVRouteClient(cluster.url, timeout_s=30.0)
            prompt = list(range(1, 41))
            first = client.generate(prompt, 2)
            # The second ask is predicted from the first's events, then served.
            second = client.generate(prompt, 2)
        finally:
            cluster.stop()
    assert first["kvroute"]["replica_id"] == second["kvroute"]["replica_id"] == "engine-a"
    assert first["kvroute"]["predicted_hit_tokens"] == 0
    assert second["kvroute"]["predicted_hit_tokens"] == 36
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 36
    host, port = cluster.url.removeprefix("http://").split(":")
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 2):
        pass
