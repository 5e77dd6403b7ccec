"""Chaos under load, bounded: replicas killed and frozen while requests run. Every
request completes or ends with a clear error within its deadline; none hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
import ray

from tests.cluster.conftest import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]

DEADLINE_S = 8.0
REQUESTS = 48


def test_kill_and_freeze_under_load_every_request_ends_within_its_deadline(
    deployment: Deployment,
) -> None:
    live = [r["replica_id"] for r in deployment.client().status()["replicas"]]
    assert len(live) >= 3, live
    frozen = ray.get_actor(live[0], namespace="kvroute")
    killed = ray.get_actor(live[1], namespace="kvroute")
    frozen_pid = ray.get(frozen.health.remote())["pid"]

    router_pid = ray.get(deployment.router.instance_id.remote())

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, str, float]:
        """(status, error code, seconds); a broken connection is status 0 with the
        exception's name, so a failure shows every outcome, not the first."""
        started = time.monotonic()
        body = {"prompt": [5000 + i, 1, 2, 3] * 16, "max_tokens": 8, "timeout": DEADLINE_S}
        try:
            async with session.post(f"{deployment.url}/v1/completions", json=body) as reply:
                payload = await reply.json()
        except aiohttp.ClientError as exc:
            return 0, type(exc).__name__, time.monotonic() - started
        code = "" if reply.status == 200 else payload["error"]["code"]
        return reply.status, code, time.monotonic() - started

    async def load_with_chaos() -> list[tuple[int, str, float]]:
        async with aiohttp.ClientSession() as session:
            tasks = []
            for i in range(REQUESTS):
                tasks.append(asyncio.ensure_future(one(session, i)))
                if i == REQUESTS // 4:
                    os.kill(frozen_pid, signal.SIGSTOP)
                if i == REQUESTS // 2:
                    ray.kill(killed, no_restart=False)
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(load_with_chaos())
    finally:
        os.kill(frozen_pid, signal.SIGCONT)
        rejoined = _wait_for_replicas(deployment, len(live), within_s=90)
    assert ray.get(deployment.router.instance_id.remote()) == router_pid, "the router restarted"
    assert len(results) == REQUESTS
    outcomes = {(status, code) for status, code, _ in results}
    assert outcomes <= {(200, ""), (504, "request_timeout"), (503, "no_replica")}, sorted(results)
    assert sum(status == 200 for status, _, _ in results) >= REQUESTS // 2
    # The deadline bounds every wait, plus routing and the HTTP round trip.
    assert max(elapsed for _, _, elapsed in results) < DEADLINE_S + 5
    assert rejoined, "the killed replica never rejoined"


def _wait_for_replicas(deployment: Deployment, count: int, within_s: float) -> bool:
    """Whether `count` replicas are registered within `within_s`: the tests after
    this one share the deployment and expect it whole."""
    deadline = time.monotonic() + within_s
    while len(deployment.client().status()["replicas"]) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
