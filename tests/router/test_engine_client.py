"""An external engine as a backend: what the router sends it, how it reads the
engine's load, and the real exchange with a `kvroute serve-replica`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ReplicaLoad,
    SamplingOptions,
    StreamChunk,
)
from kvroute.router.engines.backends import ReplicaUnavailableError
from kvroute.router.engines.http_engine import HttpEngine, parse_load
from kvroute.router.engines.kind import EngineAddress
from kvroute.router.engines.vllm import VLLM_DIALECT, vllm_engine
from tests.replicas.serve_helpers import serve_replica, tiny_config
from tests.replicas.test_serve_replica import free_port

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


def test_the_body_sends_the_hashed_token_ids_and_asks_for_tokens_and_usage() -> None:
    request = GenerateRequest(
        request_id="kv-1",
        prompt_token_ids=[5, 6, 7],
        max_tokens=9,
        cache_salt="tenant-a",
        sampling=SamplingOptions(temperature=0.0, top_k=4, seed=11, stop_token_ids=(2,)),
    )
    assert VLLM_DIALECT.completion_body(request, "base") == {
        "model": "base",
        "prompt": [5, 6, 7],
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 4,
        "seed": 11,
        "stop_token_ids": [2],
        "cache_salt": "tenant-a",
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


def test_a_lora_request_names_the_adapter_as_its_model() -> None:
    request = GenerateRequest("kv-2", [1], 1, lora_name="sql")
    body = VLLM_DIALECT.completion_body(request, "base")
    assert body["model"] == "sql"
    assert "cache_salt" not in body and "top_k" not in body and "seed" not in body


def test_load_comes_from_vllm_metric_names() -> None:
    assert parse_load(VLLM_METRICS, VLLM_DIALECT.load_metrics) == ReplicaLoad(
        running_seqs=3, waiting_seqs=5, kv_usage=0.25
    )


def test_load_sums_a_data_parallel_engines_label_sets() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0"} 2.0\n'
        'vllm:num_requests_running{engine="1"} 4.0\n'
    )
    assert parse_load(text, VLLM_DIALECT.load_metrics) == ReplicaLoad(running_seqs=6)


def test_load_reads_sglang_metric_names() -> None:
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        "sglang:num_running_reqs 7.0\n"
        "# TYPE sglang:num_queue_reqs gauge\n"
        "sglang:num_queue_reqs 1.0\n"
        "# TYPE sglang:token_usage gauge\n"
        "sglang:token_usage 0.5\n"
    )
    assert parse_load(text, VLLM_DIALECT.load_metrics) == ReplicaLoad(
        running_seqs=7, waiting_seqs=1, kv_usage=0.5
    )


def test_an_engine_without_load_metrics_reports_idle() -> None:
    assert parse_load("# TYPE up gauge\nup 1.0\n", VLLM_DIALECT.load_metrics) == ReplicaLoad()


# --- against a real `kvroute serve-replica` (in a thread, on free ports) -------


async def _run_on(url: str, *requests: GenerateRequest) -> list[list[StreamChunk | GenerateResult]]:
    """Stream each request in turn through an HttpEngine at `url`."""
    async with aiohttp.ClientSession() as session:
        engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
        return [[item async for item in engine.generate_stream(r)] for r in requests]


def _request(rid: str, tokens: list[int], max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(rid, tokens, max_tokens, sampling=SamplingOptions(temperature=0.0))


def test_a_stream_relays_each_step_and_ends_with_the_engines_cached_tokens(
    tmp_path: Path,
) -> None:
    prompt = list(range(48, 58))  # 10 tokens: 2 full blocks of 4
    with serve_replica(tiny_config(tmp_path)) as server:
        first, second = asyncio.run(
            _run_on(server.url, _request("a", prompt), _request("b", prompt))
        )
    *chunks, result = second
    assert [type(c) for c in chunks] == [StreamChunk] * 3
    assert isinstance(result, GenerateResult)
    assert [t for c in chunks for t in c.new_token_ids] == result.output_token_ids
    assert (result.num_prompt_tokens, result.num_cached_tokens) == (10, 8)
    assert (result.replica_id, result.finish_reason) == ("engine-a", "length")
    assert first[-1].num_cached_tokens == 0  # type: ignore[union-attr]


class Connections:
    """Counts the connections an aiohttp session opens and reuses (its trace hooks)."""

    def __init__(self) -> None:
        self.created = self.reused = 0
        self.trace = aiohttp.TraceConfig()
        self.trace.on_connection_create_end.append(self._on_create)
        self.trace.on_connection_reuseconn.append(self._on_reuse)

    async def _on_create(self, *_: object) -> None:
        self.created += 1

    async def _on_reuse(self, *_: object) -> None:
        self.reused += 1


async def drained(engine: HttpEngine) -> None:
    """Until `engine` has no finished stream whose body's end it still awaits."""
    deadline = time.monotonic() + 10
    while engine._draining:
        assert time.monotonic() < deadline, "a finished stream's body never ended"
        await asyncio.sleep(0.01)


def test_finished_streams_reuse_one_connection_and_an_abandoned_one_is_not(
    tmp_path: Path,
) -> None:
    """Three streams read to [DONE] share one pooled connection; a stream left early
    closes its connection (that is how the engine learns to abort), so the next
    request opens a new one."""

    async def scenario(url: str) -> tuple[int, int, int, int]:
        connections = Connections()
        async with aiohttp.ClientSession(trace_configs=[connections.trace]) as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            for rid in ("a", "b", "c"):
                await engine.generate(_request(rid, list(range(48, 58))))
                await drained(engine)
            finished = (connections.created, connections.reused)
            stream = engine.generate_stream(_request("d", list(range(48, 58)), max_tokens=50))
            await anext(stream)
            await stream.aclose()
            await engine.generate(_request("e", list(range(48, 58))))
            return (*finished, connections.created, connections.reused)

    with serve_replica(tiny_config(tmp_path, step_s=0.02)) as server:
        assert asyncio.run(scenario(server.url)) == (1, 2, 2, 3)


def test_load_and_health_come_from_the_engine(tmp_path: Path) -> None:
    async def probe(url: str) -> tuple[bool, ReplicaLoad]:
        async with aiohttp.ClientSession() as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            return await engine.healthy(), await engine.load()

    with serve_replica(tiny_config(tmp_path)) as server:
        healthy, load = asyncio.run(probe(server.url))
    assert (healthy, load) == (True, ReplicaLoad())


def test_an_engine_that_is_not_there_is_unavailable_not_invalid() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ReplicaUnavailableError, match="engine engine-a unreachable"):
        asyncio.run(_run_on(url, _request("a", [1, 2, 3])))


def test_a_request_the_engine_refuses_is_invalid_with_its_message(tmp_path: Path) -> None:
    with (
        serve_replica(tiny_config(tmp_path)) as server,
        pytest.raises(InvalidRequestError, match=r"engine engine-a refused the request: .*model"),
    ):
        asyncio.run(_run_on(server.url, GenerateRequest("a", [1, 2, 3], 2, lora_name="nope")))


def test_closing_a_stream_aborts_the_request_on_the_engine(tmp_path: Path) -> None:
    async def leave_early(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            stream = engine.generate_stream(_request("a", list(range(48, 58)), max_tokens=1000))
            await anext(stream)
            await stream.aclose()  # without an abort it would run for 50 s

    with serve_replica(tiny_config(tmp_path, step_s=0.05)) as server:
        asyncio.run(leave_early(server.url))
        deadline = time.monotonic() + 10
        while server.call(lambda: server.process.core.in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.call(lambda: server.process.core.in_flight) == 0


def test_a_prefix_cache_reset_empties_the_engines_cache(tmp_path: Path) -> None:
    async def serve_reset_serve(url: str) -> tuple[bool, int]:
        async with aiohttp.ClientSession() as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            prompt = list(range(48, 58))
            await engine.generate(_request("a", prompt))
            reset = await engine.reset_prefix_cache()
            again = await engine.generate(_request("b", prompt))
            return reset, again.num_cached_tokens

    with serve_replica(tiny_config(tmp_path)) as server:
        assert asyncio.run(serve_reset_serve(server.url)) == (True, 0)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` served on a free loopback port, as its base URL, for the block's length."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


BODY = web.AppKey("body", bytes)


def test_malformed_or_truncated_engine_output_is_the_engines_fault() -> None:
    """An engine that sends broken JSON, or ends without [DONE], is unavailable (the
    router retries elsewhere), never an internal error."""

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(request.app[BODY])
        await response.write_eof()
        return response

    async def run(body: bytes) -> str:
        app = web.Application()
        app[BODY] = body
        app.router.add_post("/v1/completions", sse)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            with pytest.raises(ReplicaUnavailableError) as caught:
                await engine.generate(_request("a", [1, 2, 3]))
            return str(caught.value)

    assert asyncio.run(run(b"data: {broken\n\n")) == "engine engine-a sent malformed JSON"
    truncated = b'data: {"choices": [{"token_ids": [5]}]}\n\n'
    assert asyncio.run(run(truncated)) == "engine engine-a ended the stream without [DONE]"


def test_load_reads_only_whole_names_past_quoted_braces_and_timestamps() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a} \\"b{",engine="0"} 2.0 1700000000000\n'
        "vllm:num_requests_running_total 40.0\n"
        "vllm:num_requests_waiting\t1e1\n"
        'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
        '# vllm:kv_cache_usage_perc{engine="1"} 0.9\n'
    )
    assert parse_load(text, VLLM_DIALECT.load_metrics) == ReplicaLoad(
        running_seqs=2, waiting_seqs=10, kv_usage=0.5
    )


def test_a_load_sample_that_is_not_a_number_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="vllm:num_requests_waiting: 'many' is not a number"):
        parse_load("vllm:num_requests_waiting many\n", VLLM_DIALECT.load_metrics)


HOLD = web.AppKey("hold", asyncio.Event)


def test_a_stream_ends_at_done_without_waiting_for_the_bodys_end_and_still_reuses() -> None:
    """An engine that sends [DONE] but ends its body only later: the stream's result
    comes at [DONE] (the server holds its end until the client has that result, so
    waiting for it would deadlock), and the connection is reused once the end comes."""
    events = [1, 2]  # how many token events each response sends before [DONE]

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for token in range(events.pop(0)):
            await response.write(b'data: {"choices": [{"token_ids": [%d]}]}\n\n' % token)
        await response.write(b"data: [DONE]\n\n")
        await request.app[HOLD].wait()
        await response.write_eof()
        return response

    async def run() -> tuple[list[int], list[int], int, int]:
        app = web.Application()
        app[HOLD] = hold = asyncio.Event()
        app.router.add_post("/v1/completions", sse)
        connections = Connections()
        async with (
            serving(app) as url,
            aiohttp.ClientSession(trace_configs=[connections.trace]) as session,
        ):
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            first = await asyncio.wait_for(engine.generate(_request("a", [1])), 10)
            hold.set()  # only now may the body end
            await drained(engine)
            second = await asyncio.wait_for(engine.generate(_request("b", [1])), 10)
            await engine.close()
            return (
                first.output_token_ids,
                second.output_token_ids,
                connections.created,
                connections.reused,
            )

    assert asyncio.run(run()) == ([0], [0, 1], 1, 1)


def test_a_pooled_connection_the_engine_closed_is_retried_once_on_a_new_one() -> None:
    """The engine answers the first request of each connection and closes the
    connection when a second arrives on it (a keep-alive that ran out as the router
    reused it): every request still succeeds, each on a connection of its own."""
    served: dict[int, int] = {}

    async def completions(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        served[id(transport)] = served.get(id(transport), 0) + 1
        if served[id(transport)] > 1:
            transport.close()
            return web.Response(status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = b'{"choices":[{"index":0,"token_ids":[7],"finish_reason":"length"}]}'
        await response.write(b"data: " + chunk + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    async def scenario(url: str) -> tuple[list[list[int]], int, int]:
        connections = Connections()
        async with aiohttp.ClientSession(trace_configs=[connections.trace]) as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            outputs = []
            for rid in ("a", "b", "c"):
                outputs.append((await engine.generate(_request(rid, [1, 2, 3]))).output_token_ids)
                await drained(engine)
            return outputs, connections.created, connections.reused

    async def run() -> tuple[list[list[int]], int, int]:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        async with serving(app) as url:
            return await scenario(url)

    # b and c each reused the connection before (refused there), then opened a new one.
    assert asyncio.run(run()) == ([[7], [7], [7]], 3, 2)


def test_an_engine_that_drops_every_request_is_unavailable_after_one_retry() -> None:
    async def completions(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=500)

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        async with serving(app) as url, aiohttp.ClientSession() as session:
            engine = vllm_engine(EngineAddress("engine-a", url, "tiny", session))
            await engine.generate(_request("a", [1, 2, 3]))

    with pytest.raises(ReplicaUnavailableError, match="engine engine-a unreachable"):
        asyncio.run(run())
