"""Engine kinds: a new kind is one module plus one registry line, and each of its four
parts (backend and dialect, event decoder, hit rule) is what the router then uses."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from kvroute.events.kv_events import DEFAULT_LIMITS, KVEventBatch
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import ZmqEventSubscriber
from kvroute.replicas.api import GenerateRequest, GenerateResult, ReplicaLoad, SamplingOptions
from kvroute.replicas.config import HashingConfig, ModelConfig
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.request import Request, SamplingParams
from kvroute.router.config import Config, RouterConfig, parse_config
from kvroute.router.core import Registration, Router, router_settings
from kvroute.router.engines.backends import EngineBackend
from kvroute.router.engines.external import ExternalEngines
from kvroute.router.engines.http_engine import HttpEngine
from kvroute.router.engines.registry import ENGINE_KINDS, engine_kind, external_kind
from kvroute.router.index.kv_index import KVIndex
from kvroute.router.policy import make_policy
from tests.events.helpers import Collector, wait_until
from tests.replicas.conftest import config, full
from tests.router import toy_engine

ALGO, SEED = "sha256", "seed"


@pytest.fixture
def toy_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registry line that adds the toy kind."""
    monkeypatch.setitem(ENGINE_KINDS, "toy", toy_engine.KIND)


def _config(url: str, kind: str) -> Config:
    engine = {
        "name": "engine-a",
        "url": url,
        "kind": kind,
        "events": {"endpoint": "tcp://127.0.0.1:9", "topic": "kv"},
    }
    return parse_config({"replicas": {"count": 0}, "external": [engine]})


def _core() -> Router:
    return Router(
        router_settings(RouterConfig(), HashingConfig(), ModelConfig(), 1), make_policy("kv_aware")
    )


def test_the_first_two_kinds_are_vllm_and_kvroutes_own_replicas() -> None:
    assert sorted(ENGINE_KINDS) == ["kvroute", "vllm"]
    assert engine_kind("vllm").backend is not None
    assert engine_kind("kvroute").backend is None


def test_an_unknown_kind_or_one_not_reached_by_url_is_refused_by_name() -> None:
    with pytest.raises(ValueError) as unknown:
        ExternalEngines(_config("http://127.0.0.1:9", "sglang"), "m", {}, print, print, _core())
    assert str(unknown.value) == (
        "external engine 'engine-a': unknown engine kind 'sglang'; known kinds: ['kvroute', 'vllm']"
    )
    with pytest.raises(ValueError) as ray_only:
        external_kind("kvroute")
    assert str(ray_only.value) == (
        "engine kind 'kvroute' is not reached by URL; external engines may be ['vllm']"
    )


class ToyServer:
    """An HTTP engine speaking the toy dialect: it records what it was sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/toy/generate", self.generate)
        self.runner = web.AppRunner(self.app)
        self.url = ""

    async def __aenter__(self) -> ToyServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="toy:running 2\ntoy:waiting 1\nvllm:num_requests_running 9\n")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.received.append((request.path, await request.json()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [
            {"choices": [{"token_ids": [5, 6], "finish_reason": None}]},
            {"choices": [{"token_ids": [7], "finish_reason": "length"}]},
            {
                "choices": [],
                "usage": {"prompt_tokens": 4, "prompt_tokens_details": {"cached_tokens": 4}},
            },
        ]
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.mark.usefixtures("toy_kind")
def test_a_toy_engine_is_admitted_with_its_kinds_backend_decoder_and_hit_rule() -> None:
    admitted: list[tuple[Registration, EngineBackend, SourceSpec]] = []

    def admit(
        registration: Registration, backend: EngineBackend, source: SourceSpec, _: Any
    ) -> None:
        admitted.append((registration, backend, source))

    async def discover_and_serve() -> tuple[GenerateResult, ReplicaLoad, list]:
        async with ToyServer() as server:
            engines = ExternalEngines(_config(server.url, "toy"), "tiny", {}, admit, print, _core())
            try:
                await engines.discover()
                (_, backend, _) = admitted[0]
                request = GenerateRequest(
                    "r1", [1, 2, 3, 4], 3, sampling=SamplingOptions(temperature=0.0)
                )
                result = await backend.generate(request)
                load = await backend.load()
            finally:
                await engines.close()
            return result, load, server.received

    result, load, received = asyncio.run(discover_and_serve())
    registration, backend, source = admitted[0]
    assert registration.hit_rule == toy_engine.KEEPS_LAST_LOGITS
    assert isinstance(backend, HttpEngine) and backend.dialect is toy_engine.TOY_DIALECT
    assert isinstance(source.decoder, toy_engine.JsonEventDecoder)
    assert received == [
        (
            "/toy/generate",
            {"model": "tiny", "input_ids": [1, 2, 3, 4], "max_new_tokens": 3, "stream": True},
        )
    ]
    assert (result.output_token_ids, result.finish_reason, result.num_cached_tokens) == (
        [5, 6, 7],
        "length",
        4,
    )
    assert load == ReplicaLoad(running_seqs=2, waiting_seqs=1)


def test_a_source_is_read_by_its_own_kinds_decoder() -> None:
    publisher = ZmqEventPublisher(
        PublisherConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    )
    collector = Collector()
    subscriber = ZmqEventSubscriber(collector.on_batch, collector.on_resync)
    try:
        publisher.start()
        subscriber.start()
        decoder = toy_engine.JsonEventDecoder(DEFAULT_LIMITS)
        spec = SourceSpec("toy", publisher.endpoint, publisher.replay_endpoint, decoder=decoder)
        subscriber.add_source(spec)
        payload = {
            "ts": 1.5,
            "stored": [{"hashes": [11, 12], "parent": None, "tokens": [0] * 8, "block_size": 4}],
            "removed": [[11]],
        }
        wait_until(
            lambda: (
                publisher.publish_payload(json.dumps(payload).encode())
                and bool(collector.seqs("toy"))
            ),
            "the toy batch",
        )
    finally:
        subscriber.stop()
        publisher.close()
    (_, batch) = collector.delivered["toy"][0]
    assert isinstance(batch, KVEventBatch) and batch.ts == 1.5
    assert [type(e).__name__ for e in batch.events] == ["BlockStored", "BlockRemoved"]
    assert batch.events[0].block_hashes == [11, 12]


def test_a_kind_that_keeps_the_last_logits_can_hit_the_whole_prompt() -> None:
    index = KVIndex(ALGO, SEED)
    layout = config(64, full(4))
    index.register("vllm-like", layout, hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    index.register(
        "toy",
        layout,
        hash_block_size=4,
        hash_algo=ALGO,
        hash_seed=SEED,
        hit_rule=toy_engine.KEEPS_LAST_LOGITS,
    )
    tokens = list(range(16))
    manager = KVCacheManager(
        layout, max_model_len=64, hash_block_size=4, enable_kv_cache_events=True
    )
    request = Request("r", tokens, SamplingParams(max_tokens=1), block_hasher=index.hasher(4))
    assert manager.allocate_slots(request, request.num_tokens) is not None
    events = manager.take_events()
    for replica in ("vllm-like", "toy"):
        index.apply(replica, KVEventBatch(ts=0.0, events=events))
    probe = Request("p", tokens, SamplingParams(max_tokens=1), block_hasher=index.hasher(4))
    assert index.predict(probe) == {"vllm-like": 12, "toy": 16}
