"""A request's life on the live cluster: real model outputs, disconnects, timeouts, overload."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import pytest
import ray

from kvroute.router.app.launch import start_router
from tests.cluster.conftest import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

LONG = 3000  # output tokens: tens of seconds of decoding, never reached in these tests


def _idle(deployment: Deployment) -> list[dict[str, Any]]:
    """Every replica's load; waits (20 s at most) until none has a running request or a
    block in use: whatever was aborted has freed its KV memory."""
    live = [r["replica_id"] for r in deployment.client().status()["replicas"]]
    handles = [ray.get_actor(name, namespace="kvroute") for name in live]
    deadline = time.monotonic() + 20
    while True:
        loads = [ray.get(h.load.remote()) for h in handles]
        if all(load.running_seqs == 0 and load.kv_usage == 0.0 for load in loads):
            return [msgspec.structs.asdict(load) for load in loads]
        assert time.monotonic() < deadline, f"replicas still busy: {loads}"
        time.sleep(0.05)


async def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/completions", json=body) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


def test_same_prompt_at_temperature_zero_gives_the_same_text_and_hits_the_cache(
    deployment: Deployment,
) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    first = asyncio.run(_post(deployment.url, {**body, "request_id": "a"}))[1]
    second = asyncio.run(_post(deployment.url, {**body, "request_id": "b"}))[1]
    assert (first["id"], second["id"]) == ("a", "b")
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 176  # 11 of 11 blocks
    other = asyncio.run(_post(deployment.url, {**body, "prompt": prompt[:-2] + "!"}))[1]
    assert other["choices"][0]["text"] != first["choices"][0]["text"]


def test_a_seed_makes_sampling_repeatable(deployment: Deployment) -> None:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 1.0, "seed": 7}
    texts = {asyncio.run(_post(deployment.url, body))[1]["choices"][0]["text"] for _ in range(3)}
    assert len(texts) == 1


def test_a_client_that_disconnects_while_waiting_frees_its_blocks(
    deployment: Deployment,
) -> None:
    async def ask_then_leave() -> None:
        body = {"prompt": [7, 8, 9] * 100, "max_tokens": LONG}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_post(deployment.url, body), timeout=1.0)

    asyncio.run(ask_then_leave())
    _idle(deployment)


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(deployment: Deployment) -> None:
    async def read_one_chunk_then_leave() -> bytes:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": [1, 2, 3] * 100, "max_tokens": LONG, "stream": True}
            async with session.post(f"{deployment.url}/v1/completions", json=body) as response:
                return await response.content.readline()

    first = asyncio.run(read_one_chunk_then_leave())
    assert first.startswith(b"data: ")
    _idle(deployment)
    status = deployment.client().status()
    assert [r["in_flight"] for r in status["replicas"]] == [0] * len(status["replicas"])


def test_a_request_past_its_timeout_is_aborted_with_a_504(deployment: Deployment) -> None:
    body = {"prompt": [9, 9, 9], "max_tokens": LONG, "timeout": 0.5}
    status, reply, _ = asyncio.run(_post(deployment.url, body))
    assert status == 504
    assert reply["error"]["code"] == "request_timeout"
    assert reply["error"]["message"] == "the request did not finish within 0.5 s and was aborted"
    _idle(deployment)


def test_overload_is_a_429_with_retry_after_never_a_hang(deployment: Deployment) -> None:
    """A second router over the same replicas, admitting one request per replica."""
    config = msgspec.structs.replace(
        deployment.config,
        router=msgspec.structs.replace(
            deployment.config.router, http_port=0, max_requests_per_replica=1
        ),
    )
    router, url = start_router(config, name="router-admission-test", curve=deployment.keys)
    try:
        assert url is not None
        live = len(deployment.client().status()["replicas"])
        ray.get(router.wait_for_replicas.remote(live))

        async def fill_then_overflow() -> tuple[list[bytes], tuple[int, dict, dict]]:
            async with aiohttp.ClientSession() as session:
                body = {"prompt": [4, 5, 6], "max_tokens": LONG, "stream": True}
                streams = [
                    await session.post(f"{url}/v1/completions", json=body) for _ in range(live)
                ]
                firsts = [await s.content.readline() for s in streams]
                overflow = await _post(url, {"prompt": [1], "max_tokens": 1})
                for stream in streams:
                    stream.close()
                return firsts, overflow

        firsts, (status, reply, headers) = asyncio.run(fill_then_overflow())
        assert all(line.startswith(b"data: ") for line in firsts)
        assert status == 429
        assert reply["error"]["code"] == "replicas_busy"
        assert headers["Retry-After"] == "1"
        metrics = ray.get(router.render_metrics.remote()).decode()
        assert 'kvroute_request_errors_total{kind="overloaded"} 1.0' in metrics
        _idle(deployment)  # the closed streams were aborted by this router
    finally:
        ray.kill(router, no_restart=True)


def test_a_stop_string_ends_the_text_and_the_request_on_its_replica(
    deployment: Deployment,
) -> None:
    prompt = [11, 22, 33] * 40
    greedy = {"prompt": prompt, "temperature": 0}
    text = asyncio.run(_post(deployment.url, {**greedy, "max_tokens": 40}))[1]["choices"][0]["text"]
    cut = next(
        i
        for i in range(4, len(text) - 2)
        if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i
    )
    body = {**greedy, "max_tokens": LONG, "stop": [text[cut : cut + 2]]}
    status, reply, _ = asyncio.run(_post(deployment.url, body))
    assert status == 200
    assert reply["choices"][0]["text"] == text[:cut]
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 60
    _idle(deployment)  # the replica was told to stop, long before LONG tokens
