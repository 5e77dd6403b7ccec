"""A router tier: several routers over one event plane, a client spread over them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
import ray

from kvroute.router.app.client import KVRouteClient
from kvroute.router.app.launch import start_router
from tests.cluster.conftest import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]


def _extra_router(deployment: Deployment, name: str) -> tuple[Any, str]:
    config = msgspec.structs.replace(
        deployment.config, router=msgspec.structs.replace(deployment.config.router, http_port=0)
    )
    router, url = start_router(config, name=name, curve=deployment.keys)
    assert url is not None
    live = len(deployment.client().status()["replicas"])
    ray.get(router.wait_for_replicas.remote(live))
    return router, url


def _ok_requests(router: Any) -> float:
    text = ray.get(router.render_metrics.remote()).decode()
    prefix = 'kvroute_requests_total{outcome="ok"}'
    lines = [x for x in text.splitlines() if x.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def _index_view(router: Any) -> dict[str, int]:
    status = ray.get(router.status.remote())
    return {r["replica_id"]: r["indexed_blocks"] for r in status["replicas"]}


def test_a_workload_through_two_routers_survives_losing_one(deployment: Deployment) -> None:
    second, second_url = _extra_router(deployment, "router-tier-a")
    client = KVRouteClient([deployment.url, second_url])
    before = (_ok_requests(deployment.router), _ok_requests(second))
    prompts = [[6000 + i, 3, 4, 5] * 12 for i in range(40)]

    async def workload_losing_a_router() -> list[dict]:
        task = asyncio.ensure_future(
            client.agenerate_batch(prompts, 4, concurrency=8, progress=False)
        )
        await asyncio.sleep(0.5)
        ray.kill(second, no_restart=True)
        return await task

    results = asyncio.run(workload_losing_a_router())
    assert len(results) == 40
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    assert _ok_requests(deployment.router) > before[0]


def test_a_new_router_rebuilds_an_index_equal_to_its_peers(deployment: Deployment) -> None:
    client = deployment.client()
    for i in range(8):
        client.generate([7000 + i, 9, 9] * 30, max_tokens=1)
    newcomer, _ = _extra_router(deployment, "router-tier-b")
    try:
        deadline = time.monotonic() + 30
        while _index_view(newcomer) != _index_view(deployment.router):
            assert time.monotonic() < deadline, (
                _index_view(newcomer),
                _index_view(deployment.router),
            )
            time.sleep(0.1)
        assert sum(_index_view(newcomer).values()) > 0
    finally:
        ray.kill(newcomer, no_restart=True)
