"""The live cluster on a local two-node Ray: routing, HTTP, faults.

Tests run in file order and share one deployment; the fault tests (replica
death, router restart) come last because they change it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from kvroute.router.app.client import KVRouteClient, KVRouteError
from kvroute.router.openai.protocol import CompletionInput
from tests.cluster.conftest import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BLOCK = 16


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


def _wait_hit(
    deployment: Deployment, replica_id: str, tokens: list[int], hit: int, **kwargs: object
) -> None:
    """Wait until the router's index (events only) shows `hit` cached tokens of
    `tokens` on `replica_id`: the events of the request that cached them landed."""
    body = CompletionInput(token_ids=tokens, max_tokens=1, **kwargs)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while (hits := ray.get(deployment.router.predict_hits.remote(body)))[replica_id] != hit:
        assert time.monotonic() < deadline, f"{replica_id} never showed {hit}: {hits}"
        time.sleep(0.05)


def test_launch_from_default_config_registers_every_replica_on_both_nodes(
    deployment: Deployment,
) -> None:
    client = deployment.client()
    assert client.get_json("/health") == {"status": "ok", "replicas": 4, "min_ready_replicas": 1}
    status = client.status()
    assert [r["replica_id"] for r in status["replicas"]] == [f"replica-{i}" for i in range(4)]
    assert {r["node_id"] for r in status["replicas"]} == set(deployment.nodes)
    assert all(r["state"] == "exact" for r in status["replicas"])


def test_shared_prefix_prompts_land_on_one_replica_with_cached_tokens(
    deployment: Deployment,
) -> None:
    client = deployment.client()
    system = _tokens(1, 40 * BLOCK)
    first = client.generate(system + _tokens(2, 30), max_tokens=2)
    home = first["kvroute"]["replica_id"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _wait_hit(deployment, home, [*system, 1], 640)
    for i in range(3):
        result = client.generate(system + _tokens(10 + i, 30), max_tokens=2)
        assert result["kvroute"]["replica_id"] == home
        # The 640-token system prompt is 40 full blocks, all cached.
        assert result["usage"]["prompt_tokens_details"]["cached_tokens"] == 640
        assert result["kvroute"]["predicted_hit_tokens"] == 640
        # The router saw the system prompt before: the replica protects it.
        assert result["kvroute"]["reuse_hint_tokens"] == 640
        assert result["usage"]["prompt_tokens"] == 670


def test_different_cache_salts_never_share(deployment: Deployment) -> None:
    client = deployment.client()
    prompt = _tokens(3, 20 * BLOCK + 5)
    salted = client.generate(prompt, max_tokens=1, cache_salt="tenant-a")
    _wait_hit(deployment, salted["kvroute"]["replica_id"], prompt, 320, cache_salt="tenant-a")
    same = client.generate(prompt, max_tokens=1, cache_salt="tenant-a")
    other = client.generate(prompt, max_tokens=1, cache_salt="tenant-b")
    plain = client.generate(prompt, max_tokens=1)
    routes = [r["kvroute"] for r in (salted, same, other, plain)]
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] == 320, routes
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert other["kvroute"]["predicted_hit_tokens"] == 0
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def _post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/v1/completions", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"prompt": [1, 2', "not valid JSON"),
        (json.dumps({"prompt": []}).encode(), "prompt is empty"),
        (json.dumps({"prompt": ""}).encode(), "prompt is empty"),
        (json.dumps({"prompt": [5] * 8192}).encode(), "max_model_len is 8192"),
        (json.dumps({"prompt": [1, 32000]}).encode(), "token id 32000 is outside the vocabulary"),
        (
            json.dumps({"prompt": [1, 2], "lora_name": "nope"}).encode(),
            "unknown LoRA adapter 'nope'",
        ),
        (
            json.dumps({"prompt": [1, 2], "max_tokens": -3}).encode(),
            "`max_tokens` must be at least 1, got -3",
        ),
        (json.dumps({"prompt": {"a": 1}}).encode(), "`prompt` must be a string, a list"),
        (json.dumps([1, 2]).encode(), "must be a JSON object"),
    ],
)
def test_bad_input_is_a_400_naming_the_problem(
    deployment: Deployment, body: bytes, message: str
) -> None:
    status, payload = _post(deployment.url, body)
    assert status == 400
    assert message in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


def test_bad_requests_do_not_disturb_good_ones(deployment: Deployment) -> None:
    url = deployment.url

    async def burst() -> list[int]:
        loop = asyncio.get_running_loop()
        good = json.dumps({"prompt": _tokens(5, 64), "max_tokens": 2}).encode()
        bad = json.dumps({"prompt": [1, 99_999]}).encode()
        calls = [loop.run_in_executor(None, _post, url, good if i % 2 else bad) for i in range(10)]
        return [status for status, _ in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [400, 200] * 5


def test_text_prompt_and_known_lora_through_the_python_client(deployment: Deployment) -> None:
    client = deployment.client()
    result = client.generate("Hello, kvroute! " * 4, max_tokens=3, lora_name="support-bot")
    assert result["usage"]["prompt_tokens"] == 64
    assert result["usage"]["completion_tokens"] == 3
    assert result["usage"]["completion_tokens"] == 3
    assert result["choices"][0]["finish_reason"] == "length"
    with pytest.raises(KVRouteError, match="HTTP 400: unknown LoRA adapter 'other'"):
        client.generate("hi", lora_name="other")


def test_streaming_delivers_every_token_then_usage(deployment: Deployment) -> None:
    client = deployment.client()
    prompt = _tokens(9, 100)
    chunks = list(client.stream(prompt, max_tokens=5))
    *deltas, finishing, usage = chunks
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in deltas)
    assert all(chunk["usage"] is None for chunk in [*deltas, finishing])
    assert finishing["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["prompt_tokens"] == 100
    replica = finishing["kvroute"]["replica_id"]
    _wait_hit(deployment, replica, prompt, 96)
    replay = client.generate(prompt, max_tokens=5)
    assert replay["kvroute"]["replica_id"] == replica
    assert replay["usage"]["completion_tokens"] == 5
    with pytest.raises(KVRouteError, match="HTTP 400: token id 99999"):
        list(client.stream([1, 99_999]))


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_each_request_and_its_tokens(deployment: Deployment) -> None:
    client = deployment.client()
    prompt = _tokens(41, 10 * BLOCK + 3)
    before = _metrics(deployment.url)
    first = client.generate(prompt, max_tokens=2)
    home = first["kvroute"]["replica_id"]
    _wait_hit(deployment, home, prompt, 160)
    second = client.generate(prompt, max_tokens=2)
    assert second["kvroute"]["replica_id"] == home
    after = _metrics(deployment.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("kvroute_requests_total", outcome="ok") == 2
    assert delta("kvroute_prompt_tokens_total") == 2 * 163
    assert delta("kvroute_cached_tokens_total") == 160
    assert delta("kvroute_predicted_hit_tokens_total") == 160
    assert delta("kvroute_routing_seconds_count") == 2
    assert delta("kvroute_ttft_seconds_count") == 2
    assert after[("kvroute_replica_state", (("replica", home), ("state", "exact")))] == 1
    assert delta("kvroute_event_stream_total", counter="batches", replica=home) >= 1
    assert after[("kvroute_index_entries", ())] >= 10


def test_metrics_endpoint_exposes_the_front_door_and_stream_families(
    deployment: Deployment,
) -> None:
    deployment.client().generate(_tokens(7, 40), max_tokens=2)
    status, _ = _post(deployment.url, b"{}")
    assert status == 400
    with urllib.request.urlopen(f"{deployment.url}/metrics", timeout=10) as response:
        text = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain")
    for name in (
        'kvroute_requests_total{outcome="ok"}',
        "kvroute_cached_tokens_total",
        "kvroute_routing_seconds_bucket",
        'kvroute_replica_state{replica="replica-0",state="exact"} 1.0',
        'kvroute_event_stream_total{counter="batches",replica="replica-1"}',
        'kvroute_http_responses_total{endpoint="/v1/completions",status="200"}',
        'kvroute_request_errors_total{kind="invalid_request"}',
        "kvroute_e2e_ttft_seconds_bucket",
        "kvroute_inter_token_seconds_bucket",
        'kvroute_replica_in_flight{replica="replica-0"}',
        'kvroute_index_dropped_total{reason="bad_hash"} 0.0',
        "kvroute_index_entries",
    ):
        assert name in text, name


def test_requests_spread_across_replicas_on_both_nodes(deployment: Deployment) -> None:
    client = deployment.client()
    prompts = [_tokens(100 + i, 300) for i in range(24)]
    results = client.generate_batch(prompts, 2, concurrency=8, progress=False)
    served = {r["kvroute"]["replica_id"] for r in results}
    assert served == {f"replica-{i}" for i in range(4)}


def _in_flight_on(client: KVRouteClient, replica_id: str) -> bool:
    replicas = {r["replica_id"]: r for r in client.status()["replicas"]}
    return replicas[replica_id]["in_flight"] > 0


def test_killing_a_replica_mid_load_loses_no_request(deployment: Deployment) -> None:
    client = deployment.client()
    victim = deployment.replicas[3]
    prompts = [_tokens(200 + i, 400) for i in range(40)]

    async def load_then_kill() -> list[dict]:
        task = asyncio.ensure_future(
            client.agenerate_batch(prompts, 24, concurrency=20, progress=False)
        )
        # Kill it once requests are in flight on it (as the router counts them).
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_in_flight_on, client, "replica-3"):
            assert not task.done(), "the batch finished before replica-3 had a request"
            assert time.monotonic() < deadline, "replica-3 never had a request in flight"
            await asyncio.sleep(0.01)  # a poll interval, not a synchronisation
        ray.kill(victim, no_restart=True)
        return await task

    results = asyncio.run(load_then_kill())
    assert len(results) == 40
    assert all(r["usage"]["completion_tokens"] == 24 for r in results)
    retried = [r for r in results if r["kvroute"]["attempts"] > 1]
    assert retried, "no request was in flight on the killed replica"
    assert "replica-3" not in {r["kvroute"]["replica_id"] for r in retried}
    status = client.status()
    assert [r["replica_id"] for r in status["replicas"]] == ["replica-0", "replica-1", "replica-2"]
    assert client.get_json("/health")["replicas"] == 3


def test_router_restart_rebuilds_the_index_from_snapshots(deployment: Deployment) -> None:
    client = deployment.client()
    system = _tokens(7, 30 * BLOCK)
    home = client.generate([*system, 1, 2, 3], max_tokens=1)["kvroute"]["replica_id"]
    _wait_hit(deployment, home, [*system, 4], 480)
    before = {r["replica_id"]: r["indexed_blocks"] for r in client.status()["replicas"]}
    old_instance = ray.get(deployment.router.instance_id.remote())
    ray.kill(deployment.router, no_restart=False)
    # ray.kill is asynchronous: wait until calls reach the restarted process.
    deadline = time.monotonic() + 60
    while True:
        try:
            if ray.get(deployment.router.instance_id.remote(), timeout=10) != old_instance:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the router did not restart"
        time.sleep(0.1)
    url = ray.get(deployment.router.ready.remote())
    restarted = KVRouteClient(url)
    after = {r["replica_id"]: r["indexed_blocks"] for r in restarted.status()["replicas"]}
    assert after == before
    again = restarted.generate([*system, 4, 5, 6], max_tokens=1)
    assert again["kvroute"]["replica_id"] == home
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 480
    assert again["kvroute"]["predicted_hit_tokens"] == 480
