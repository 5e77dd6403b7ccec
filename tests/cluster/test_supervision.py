"""Replicas that freeze or crash: routing goes around them, and a restarted one rejoins."""

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


def _wait(predicate: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _live(deployment: Deployment) -> list[str]:
    return [r["replica_id"] for r in deployment.client().status()["replicas"]]


def _pushed(deployment: Deployment) -> dict[str, int]:
    return {r["replica_id"]: r["loads_pushed"] for r in deployment.client().status()["replicas"]}


def test_a_frozen_replica_costs_at_most_the_deadline_and_is_routed_around(
    deployment: Deployment,
) -> None:
    victim_name = _live(deployment)[0]
    victim = ray.get_actor(victim_name, namespace="kvroute")
    pid = ray.get(victim.health.remote())["pid"]
    deadline_s = 5.0
    # Every replica pushes its load (CURVE, on its event socket), idle ones included:
    # the freeze below is seen by the silence of those pushes as by an unanswered poll.
    _wait(
        lambda: all(r["loads_pushed"] >= 2 for r in deployment.client().status()["replicas"]),
        "every replica's pushed loads",
    )
    pushed = _pushed(deployment)[victim_name]

    async def burst() -> list[tuple[int, dict]]:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[int, dict]:
                body = {"prompt": [3000 + i, 5, 6, 7] * 10, "max_tokens": 2, "timeout": deadline_s}
                async with session.post(f"{deployment.url}/v1/completions", json=body) as reply:
                    return reply.status, await reply.json()

            return await asyncio.gather(*(one(i) for i in range(24)))

    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = asyncio.run(burst())
        elapsed = time.monotonic() - started
        suspects = [
            r["replica_id"] for r in deployment.client().status()["replicas"] if r["suspect"]
        ]
    finally:
        os.kill(pid, signal.SIGCONT)
    served = [body["kvroute"]["replica_id"] for status, body in results if status == 200]
    timed_out = [body for status, body in results if status == 504]
    assert len(served) + len(timed_out) == 24
    assert victim_name not in served
    assert all(body["error"]["code"] == "request_timeout" for body in timed_out)
    assert elapsed < 3 * deadline_s  # nothing waited for the freeze itself
    assert suspects == [victim_name]
    _wait(
        lambda: not any(r["suspect"] for r in deployment.client().status()["replicas"]),
        "the thawed replica to answer again",
    )
    _wait(lambda: _pushed(deployment)[victim_name] > pushed, "the thawed replica's pushes")


def test_a_crashed_replica_is_restarted_and_rejoins_the_index(deployment: Deployment) -> None:
    name = _live(deployment)[-1]
    handle = ray.get_actor(name, namespace="kvroute")
    old_pid = ray.get(handle.health.remote())["pid"]
    ray.kill(handle, no_restart=False)
    _wait(lambda: name not in _live(deployment), f"{name} to leave the index", 30)
    _wait(lambda: name in _live(deployment), f"{name} to rejoin", 90)
    assert ray.get(handle.health.remote())["pid"] != old_pid
    client = deployment.client()
    prompt = [4242, 1, 2, 3] * 20
    replicas = {client.generate(prompt, max_tokens=1)["kvroute"]["replica_id"] for _ in range(2)}
    assert len(replicas) == 1
    status = {r["replica_id"]: r for r in client.status()["replicas"]}
    assert status[name]["state"] == "exact"
