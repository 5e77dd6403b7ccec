"""The router service with an external engine, in-process (no Ray): a real
`serve-replica` that fails its health check leaves routing, and one whose events
contradict the layout it was configured with is refused by name, never
mispredicted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from kvroute.events.curve import CurveKeyPair
from kvroute.events.kv_events import BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.router.config import Config, parse_config
from kvroute.router.openai.protocol import CompletionInput
from kvroute.router.service.router_service import RouterService
from tests.replicas.serve_helpers import events_json, serve_replica, tiny_config
from tests.replicas.test_serve_replica import free_port, post

pytestmark = pytest.mark.timeout(120)
DEADLINE_S = 30.0


def _config(url: str, events_port: int, block_size: int) -> Config:
    """A router in front of one engine declared with 4- or 8-token blocks."""
    layout = {
        "block_size": block_size,
        "vocab_size": 256,
        "max_model_len": 1024,
        "groups": [{"kind": "full_attention", "num_kv_heads": 2, "head_size": 8}],
    }
    engine = {
        "name": "engine-a",
        "url": url,
        "events": {"endpoint": f"tcp://127.0.0.1:{events_port}", "topic": "kv"},
        "layout": layout,
    }
    data = {"replicas": {"count": 0}, "router": {"supervise_s": 0.2}, "external": [engine]}
    return parse_config(data)


def _service(config: Config) -> RouterService:
    return RouterService(config, serve_http=False, curve=CurveKeyPair.generate())


def test_an_engine_whose_health_check_fails_leaves_routing(tmp_path: Path) -> None:
    port = free_port()
    with serve_replica(tiny_config(tmp_path), events_json(port)) as server:

        async def admit_then_fail() -> tuple[list[str], list[str]]:
            service = _service(_config(server.url, port, block_size=4))
            try:
                await asyncio.wait_for(service.ready(), DEADLINE_S)
                admitted = service.replica_ids()
                # The engine core stops; its HTTP server stays up and answers 503.
                await asyncio.to_thread(server.call, server.process.core.stop())
                deadline = time.monotonic() + DEADLINE_S
                while service.replica_ids():
                    assert time.monotonic() < deadline, "the engine stayed in routing"
                    await asyncio.sleep(0.05)
                return admitted, service.replica_ids()
            finally:
                await service.shutdown()

        assert asyncio.run(admit_then_fail()) == (["engine-a"], [])


def test_an_engine_whose_events_contradict_its_layout_is_refused_by_name(tmp_path: Path) -> None:
    port = free_port()
    with serve_replica(tiny_config(tmp_path), events_json(port)) as server:
        # The engine caches 4-token blocks; its entry says 8.
        config = _config(server.url, port, block_size=8)

        async def serve_and_watch() -> tuple[list[str], dict]:
            service = _service(config)
            try:
                await asyncio.wait_for(service.ready(), DEADLINE_S)
                admitted = service.replica_ids()
                deadline = time.monotonic() + DEADLINE_S
                attempt = 0
                while "engine-a" not in service.refused:
                    assert time.monotonic() < deadline, "the engine was never refused"
                    # A new prompt each time stores new blocks: a cached one publishes
                    # nothing, and the first batch may go out before the subscriber joins.
                    attempt += 1
                    await asyncio.to_thread(
                        post,
                        server.url,
                        "/v1/completions",
                        {"prompt": f"{attempt:04d}0123456789", "max_tokens": 1},
                    )
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # a supervise pass or two: it is not re-admitted
                return admitted, service.status()
            finally:
                await service.shutdown()

        admitted, status = asyncio.run(serve_and_watch())
    assert admitted == ["engine-a"]
    assert status["replicas"] == []
    assert status["refused"] == {
        "engine-a": "its KV events do not match its configured layout (group 0: "
        "full_attention of block size 8): an unknown group, or another kind or block size"
    }


def test_an_engine_that_cached_prompts_before_the_router_joined_gets_predicted_hits(
    tmp_path: Path,
) -> None:
    """The router catches up from the engine's replay buffer on joining: blocks the
    engine cached before the router started are indexed, so they are predicted."""
    port, replay_port = free_port(), free_port()
    events = events_json(port).replace(
        '"topic"', f'"replay_endpoint": "tcp://127.0.0.1:{replay_port}", "topic"'
    )
    prompts = ["0123456789abcdef", "fedcba9876543210xyz"]
    with serve_replica(tiny_config(tmp_path), events) as server:
        for prompt in prompts:
            post(server.url, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        config = _config(server.url, port, block_size=4)
        engine = config.external[0]
        engine = msgspec.structs.replace(
            engine,
            events=msgspec.structs.replace(
                engine.events, replay_endpoint=f"tcp://127.0.0.1:{replay_port}"
            ),
        )
        config = msgspec.structs.replace(config, external=[engine])

        async def join_then_predict() -> list[dict[str, int]]:
            service = _service(config)
            try:
                await asyncio.wait_for(service.ready(), DEADLINE_S)
                deadline = time.monotonic() + DEADLINE_S
                while True:
                    hits = [service.predict_hits(CompletionInput(text=p)) for p in prompts]
                    if all(h["engine-a"] for h in hits) or time.monotonic() > deadline:
                        return hits
                    await asyncio.sleep(0.05)
            finally:
                await service.shutdown()

        hits = asyncio.run(join_then_predict())
    # Byte tokens, 4-token blocks: every full block, short of the prompt's last token.
    assert hits == [{"engine-a": 12}, {"engine-a": 16}]


def test_a_reset_empties_the_engine_in_the_index_before_its_event_arrives(
    tmp_path: Path,
) -> None:
    """vLLM publishes AllBlocksCleared only at its next step: the router must not wait
    for it. Here the engine's events go where the router does not listen, so only the
    reset itself can empty the index."""
    engine_events, silent = free_port(), free_port()
    prompt = tuple(range(40, 60))
    stored = BlockStored(
        block_hashes=[1, 2, 3, 4],
        parent_block_hash=None,
        token_ids=list(prompt[:16]),
        block_size=4,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    with serve_replica(tiny_config(tmp_path), events_json(engine_events)) as server:
        config = _config(server.url, silent, block_size=4)

        async def index_then_reset() -> tuple[dict[str, int], bool, dict[str, int]]:
            service = _service(config)
            try:
                await asyncio.wait_for(service.ready(), DEADLINE_S)
                service.core.apply("engine-a", KVEventBatch(ts=0.0, events=[stored]))
                before = service.core.index.predict(PromptKeys(prompt))
                reset = await service.reset_prefix_caches()
                return before, reset, service.core.index.predict(PromptKeys(prompt))
            finally:
                await service.shutdown()

        before, reset, after = asyncio.run(index_then_reset())
    assert (before, reset, after) == ({"engine-a": 16}, True, {"engine-a": 0})


def test_a_seeded_engine_whose_salted_blocks_contradict_its_dialect_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """serve-replica hashes untagged; an entry that says `tagged` is refused at its
    first salted block, with the dialect it does hash in."""
    port = free_port()
    with serve_replica(tiny_config(tmp_path, seed="s1"), events_json(port)) as server:
        config = _config(server.url, port, block_size=4)
        engine = msgspec.structs.replace(
            config.external[0], hash_mode="seeded", hash_seed="s1", hash_dialect="tagged"
        )
        config = msgspec.structs.replace(
            config,
            hashing=msgspec.structs.replace(config.hashing, seed="s1"),
            external=[engine],
        )

        async def serve_salted() -> dict:
            service = _service(config)
            try:
                await asyncio.wait_for(service.ready(), DEADLINE_S)
                deadline = time.monotonic() + DEADLINE_S
                attempt = 0
                while "engine-a" not in service.refused:
                    assert time.monotonic() < deadline, "the engine was never refused"
                    attempt += 1
                    body = {"prompt": f"{attempt:04d}salted", "max_tokens": 1, "cache_salt": "t"}
                    await asyncio.to_thread(post, server.url, "/v1/completions", body)
                    await asyncio.sleep(0.1)
                return service.status()
            finally:
                await service.shutdown()

        status = asyncio.run(serve_salted())
    assert status["replicas"] == []
    assert status["refused"] == {
        "engine-a": "its salted or LoRA blocks hash as untagged, but its hash_dialect is "
        "tagged: set hash_dialect: untagged"
    }
