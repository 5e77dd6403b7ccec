"""Nothing stalls: the router's own stall is not its replicas', a frozen engine does
not hold its requests, a failing engine is routed around before it is dropped, and a
silent event stream is flagged. In-process routers (no Ray) in front of real
`serve-replica` engines, each on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from kvroute.events.curve import CurveKeyPair
from kvroute.replicas.api import SamplingOptions, StreamChunk
from kvroute.router.config import Config, parse_config
from kvroute.router.openai.protocol import CompletionInput, RoutedResult
from kvroute.router.service.loop_lag import LoopLag
from kvroute.router.service.router_service import RouterService
from tests.replicas.serve_helpers import ServerThread, events_json, serve_replica, tiny_config
from tests.replicas.test_serve_replica import free_port
from tests.router.engine_proxy import engine_proxy

pytestmark = pytest.mark.timeout(180)
DEADLINE_S = 30.0
T = TypeVar("T")
LAYOUT = {
    "block_size": 4,
    "vocab_size": 256,
    "max_model_len": 1024,
    "groups": [{"kind": "full_attention", "num_kv_heads": 2, "head_size": 8}],
}


def _config(engines: list[tuple[str, int]], **router: Any) -> Config:
    """A router in front of engines (url, events port) named engine-0, engine-1, ..."""
    external = [
        {
            "name": f"engine-{i}",
            "url": url,
            "events": {"endpoint": f"tcp://127.0.0.1:{port}", "topic": "kv"},
            "layout": LAYOUT,
        }
        for i, (url, port) in enumerate(engines)
    ]
    data = {
        "model": {"name": "tiny"},
        "replicas": {"count": 0},
        "router": {"supervise_s": 0.2, "policy": "round_robin", **router},
        "external": external,
    }
    return parse_config(data)


async def _with_service(config: Config, scenario: Callable[[RouterService], Awaitable[T]]) -> T:
    service = RouterService(config, serve_http=False, curve=CurveKeyPair.generate())
    try:
        await asyncio.wait_for(service.ready(), DEADLINE_S)
        await service.wait_for_replicas(len(config.external), DEADLINE_S)
        return await scenario(service)
    finally:
        await service.shutdown()


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def stream_through(service: RouterService, text: str, max_tokens: int) -> None:
    """Stream one request of exactly `max_tokens` tokens through `service` to its end."""
    unit = CompletionInput(
        text=text, max_tokens=max_tokens, stream=True, sampling=SamplingOptions(ignore_eos=True)
    )
    async for _ in service.generate_stream(unit):
        pass


def _freeze(server: ServerThread) -> threading.Event:
    """Block the engine's whole event loop (HTTP and engine) until the event is set:
    a frozen process, as SIGSTOP makes it."""
    thaw = threading.Event()
    server.loop.call_soon_threadsafe(thaw.wait, DEADLINE_S)
    return thaw


def _unit(text: str, stream: bool = False) -> CompletionInput:
    return CompletionInput(text=text, max_tokens=2, stream=stream, sampling=SamplingOptions())


def test_loop_lag_sees_a_stall_in_progress_and_after_it() -> None:
    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        lag = LoopLag(loop, interval_s=0.01)
        await asyncio.sleep(0.05)
        started = loop.time()
        time.sleep(0.3)  # the loop is blocked: no tick runs
        during = lag.max_since(started)
        await asyncio.sleep(0.05)
        after = lag.max_since(started)
        before = lag.max_since(loop.time() + 1)
        lag.stop()
        return during, after, before

    during, after, before = asyncio.run(scenario())
    assert during >= 0.25
    assert after >= 0.25
    assert before == 0.0


def test_a_load_report_missed_during_the_routers_own_stall_suspects_no_replica(
    tmp_path: Path,
) -> None:
    port = free_port()
    with serve_replica(tiny_config(tmp_path), events_json(port)) as server:
        config = _config([(server.url, port)], load_timeout_s=0.2, loop_lag_tolerance_s=0.5)

        async def stall(service: RouterService) -> list[bool]:
            seen = []
            for _ in range(3):
                time.sleep(1.0)  # the router's loop is blocked, its replica is fine
                await asyncio.sleep(0.3)  # the poll that timed out is judged
                seen.append(service.core.replicas["engine-0"].suspect)
            return seen

        assert asyncio.run(_with_service(config, stall)) == [False, False, False]


def test_a_frozen_engine_is_suspected_when_the_router_is_on_time(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    with (
        serve_replica(tiny_config(tmp_path), events_json(ports[0])) as a,
        serve_replica(tiny_config(tmp_path), events_json(ports[1])) as b,
    ):
        config = _config([(a.url, ports[0]), (b.url, ports[1])], load_timeout_s=0.3)

        async def watch(service: RouterService) -> tuple[bool, bool]:
            thaw = _freeze(a)
            try:
                await _until(lambda: service.core.replicas["engine-0"].suspect, "suspected")
                return service.core.replicas["engine-0"].suspect, service.core.replicas[
                    "engine-1"
                ].suspect
            finally:
                thaw.set()

        assert asyncio.run(_with_service(config, watch)) == (True, False)


def test_an_engine_streaming_tokens_is_not_suspected_for_a_late_load_report(
    tmp_path: Path,
) -> None:
    """Its `/metrics` answers after the load timeout, but tokens and events keep
    coming: not suspect. Once its traffic stops, the same late answers suspect it."""
    events, port = free_port(), free_port()
    with serve_replica(tiny_config(tmp_path, step_s=0.02), events_json(events)) as server:

        async def scenario() -> tuple[list[bool], bool]:
            proxy = await engine_proxy(server.url, metrics_delay_s=1.0)
            await web.TCPSite(proxy, "127.0.0.1", port).start()
            config = _config(
                [(f"http://127.0.0.1:{port}", events)],
                load_timeout_s=0.3,
                engine_load_poll_s=0.2,
            )

            async def serve(service: RouterService) -> tuple[list[bool], bool]:
                suspect = lambda: service.core.replicas["engine-0"].suspect  # noqa: E731
                seen = []
                for i in range(6):  # 6 x 8 tokens x 20 ms: about 1 s of streaming
                    await stream_through(service, f"busy engine {i}", max_tokens=8)
                    seen.append(suspect())
                await _until(suspect, "suspected once idle")
                return seen, suspect()

            try:
                return await _with_service(config, serve)
            finally:
                await proxy.cleanup()

        assert asyncio.run(scenario()) == ([False] * 6, True)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_requests_on_a_frozen_engine_move_once_to_the_next(tmp_path: Path, stream: bool) -> None:
    """Requests dispatched to an engine that then froze finish on the other one while
    it is still frozen; each was dispatched twice at most, its output not doubled."""
    ports = [free_port(), free_port()]
    with (
        serve_replica(tiny_config(tmp_path), events_json(ports[0])) as a,
        serve_replica(tiny_config(tmp_path), events_json(ports[1])) as b,
    ):
        config = _config(
            [(a.url, ports[0]), (b.url, ports[1])],
            load_timeout_s=0.3,
            first_token_timeout_s=0.5,
        )

        async def one(service: RouterService, i: int) -> tuple[str, int, int]:
            unit = _unit(f"prompt number {i} " * 3, stream)
            tokens = 0
            routed: RoutedResult | None = None
            if stream:
                async for item in service.generate_stream(unit):
                    if isinstance(item, StreamChunk):
                        tokens += len(item.new_token_ids)
                    else:
                        routed = item
            else:
                routed = await service.generate(unit)
                tokens = len(routed.result.output_token_ids)
            assert routed is not None
            return routed.result.replica_id, routed.attempts, tokens

        async def freeze_then_send(service: RouterService) -> list[tuple[str, int, int]]:
            thaw = _freeze(a)
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*(one(service, i) for i in range(4))), DEADLINE_S / 2
                )
            finally:
                thaw.set()

        results = asyncio.run(_with_service(config, freeze_then_send))
    assert {replica for replica, _, _ in results} == {"engine-1"}
    assert {attempts for _, attempts, _ in results} <= {1, 2}
    assert 2 in {attempts for _, attempts, _ in results}
    assert [tokens for _, _, tokens in results] == [2, 2, 2, 2]


def test_a_failing_engine_is_routed_around_first_and_removed_only_after_the_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with serve_replica(tiny_config(tmp_path), events_json(port)) as server:
        config = _config([(server.url, port)], engine_failure_window_s=1.5)

        async def fail(service: RouterService) -> tuple[bool, list[str], list[str]]:
            # The engine core stops; its HTTP server stays up and answers 503.
            await asyncio.to_thread(server.call, server.process.core.stop())
            await _until(lambda: service.core.replicas["engine-0"].failing, "failing")
            routed_while_failing = service.replica_ids()
            await _until(lambda: not service.replica_ids(), "removed")
            return True, routed_while_failing, service.replica_ids()

        with caplog.at_level(logging.WARNING):
            outcome = asyncio.run(_with_service(config, fail))
    assert outcome == (True, ["engine-0"], [])
    removal = [r.getMessage() for r in caplog.records if "has failed for" in r.getMessage()]
    assert len(removal) == 1
    assert "its /health did not answer 200" in removal[0]


def test_an_engine_whose_event_stream_stays_silent_while_serving_is_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine publishes no events (none configured), but the router was told an
    endpoint: after serving it is flagged in /status and logged once."""
    with serve_replica(tiny_config(tmp_path)) as server:
        config = _config([(server.url, free_port())], engine_events_silence_s=0.5)

        async def serve(service: RouterService) -> list[bool]:
            await service.generate(_unit("hello there, engine"))
            flagged = lambda: service.status()["replicas"][0]["events_silent"]  # noqa: E731
            await _until(flagged, "flagged")
            await asyncio.sleep(0.5)  # more supervise passes: logged once only
            return [r["events_silent"] for r in service.status()["replicas"]]

        with caplog.at_level(logging.WARNING):
            assert asyncio.run(_with_service(config, serve)) == [True]
    lines = [r.getMessage() for r in caplog.records if "carried nothing" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("event stream of engine-0 carried nothing for")


def test_status_reports_the_routers_loop_lag(tmp_path: Path) -> None:
    port = free_port()
    with serve_replica(tiny_config(tmp_path), events_json(port)) as server:

        async def look(service: RouterService) -> dict[str, Any]:
            await asyncio.sleep(0.5)
            return service.status()["loop_lag"]

        lag = asyncio.run(_with_service(_config([(server.url, port)]), look))
    assert set(lag) == {"last_s", "p50_s", "p99_s", "max_s", "samples"}
    assert lag["samples"] >= 1
    assert 0 <= lag["p50_s"] <= lag["p99_s"] <= lag["max_s"]
