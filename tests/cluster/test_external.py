"""The router in front of engines it did not start: three `kvroute serve-replica`
processes, each hashing with its own root (two random, as vLLM without
PYTHONHASHSEED, one from PYTHONHASHSEED), none with the router's seed, behind a
tier of two routers that share their routing decisions.

The router keys their blocks by its own hash of the token ids their events
carry, so its prediction must equal every engine's reported cached tokens.
An engine killed under load costs no request, leaves the index, and rejoins
when it comes back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from kvroute.benchmarks.engines import ENGINE_MODEL, Engine
from kvroute.router.app.client import KVRouteClient
from kvroute.router.app.launch import cluster_keys, start_router
from kvroute.router.config import Config, parse_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]
DEADLINE_S = 60.0


def _router_config(engines: list[Engine]) -> Config:
    data = yaml.safe_load(ENGINE_MODEL)
    data["cluster"] = {"namespace": "kvroute-external"}
    data["replicas"]["count"] = 0
    data["router"] = {"http_port": 0, "supervise_s": 0.5, "load_timeout_s": 1.0, "count": 2}
    data["external"] = [engine.external_entry() for engine in engines]
    return parse_config(data, "external-test")


@pytest.fixture(scope="module")
def fleet(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    config_path = Path(tmp_path_factory.mktemp("engines")) / "engine.yaml"
    config_path.write_text(ENGINE_MODEL)
    engines = [
        Engine("engine-1", config_path, hash_seed=None),
        Engine("engine-2", config_path, hash_seed=None),
        Engine("engine-3", config_path, hash_seed="12345"),
    ]
    for engine in engines:
        engine.start()
    try:
        for engine in engines:
            engine.wait_healthy()
        config = _router_config(engines)
        keys = cluster_keys(config)
        routers = [start_router(config, name=name, curve=keys) for name in ("router", "router-1")]
        urls = [url for _, url in routers]
        assert None not in urls
        yield engines, KVRouteClient(urls[0]), KVRouteClient(urls[1])  # type: ignore[arg-type]
        for router, _ in routers:
            ray.kill(router, no_restart=True)
    finally:
        for engine in engines:
            engine.stop()


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _tenant_prompts(seed: int, tenants: int, rounds: int) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(32, 127) for _ in range(160)] for _ in range(tenants)]
    return [
        systems[t] + [rng.randrange(32, 127) for _ in range(rng.randrange(8, 40))]
        for _ in range(rounds)
        for t in range(tenants)
    ]


def test_predictions_equal_every_engines_cached_tokens_without_knowing_their_seeds(
    fleet: Any,
) -> None:
    _, client, peer = fleet
    _wait(lambda: len(client.status()["replicas"]) == 3, "three engines")
    # A SUB joins late and silently: wait until the peer hears the first router's beats.
    _wait(lambda: peer.status()["decisions"]["live_peers"] == ["router"], "the routers to pair up")
    seen: dict[str, int] = {}
    hits = 0
    for prompt in _tenant_prompts(seed=1, tenants=4, rounds=3):
        result = client.generate(prompt, max_tokens=4)
        cached = result["usage"]["prompt_tokens_details"]["cached_tokens"]
        routing = result["kvroute"]
        assert routing["predicted_hit_tokens"] == cached, routing
        hits += cached
        seen[routing["replica_id"]] = seen.get(routing["replica_id"], 0) + 1
        # Let the engine's events settle every prediction: the next request is then
        # predicted from re-keyed events alone.
        _wait(lambda: client.status()["predicted_entries"] == 0, "events to settle predictions")
    assert hits >= 8 * 160  # every tenant's later rounds hit its system prompt
    assert len(seen) >= 2
    status = client.status()
    assert status["index_dropped"] == {
        "unknown_replica": 0,
        "unknown_group": 0,
        "mismatched_group": 0,
        "bad_hash": 0,
    }
    assert all(r["kind"] == "external" and r["state"] == "exact" for r in status["replicas"])
    # The second router recorded every decision of the first as its own predictions.
    shared = peer.status()["decisions"]
    assert shared["received"] == status["decisions"]["published"] == 12
    assert shared["peer_unknown_replica"] == 0 and shared["lost"] == 0


def test_a_killed_engine_loses_no_request_leaves_the_index_and_rejoins(fleet: Any) -> None:
    engines, client, _ = fleet
    _wait(lambda: len(client.status()["replicas"]) == 3, "three engines")
    victim = engines[1]
    prompts = _tenant_prompts(seed=2, tenants=6, rounds=4)

    async def load_and_kill() -> list[dict[str, Any]]:
        batch = asyncio.ensure_future(
            client.agenerate_batch(prompts, max_tokens=24, concurrency=8, progress=False)
        )
        await asyncio.sleep(0.5)
        victim.kill()
        return await asyncio.wait_for(batch, DEADLINE_S)

    results = asyncio.run(load_and_kill())
    assert len(results) == len(prompts)
    assert all(r["usage"]["completion_tokens"] == 24 for r in results)
    _wait(
        lambda: victim.name not in {r["replica_id"] for r in client.status()["replicas"]},
        "the dead engine to leave routing",
    )
    victim.start().wait_healthy()
    _wait(
        lambda: victim.name in {r["replica_id"] for r in client.status()["replicas"]},
        "the engine to rejoin",
    )
    rejoined = next(r for r in client.status()["replicas"] if r["replica_id"] == victim.name)
    assert (rejoined["indexed_blocks"], rejoined["state"]) == (0, "exact")
    assert client.generate(prompts[0], max_tokens=2)["usage"]["completion_tokens"] == 2
