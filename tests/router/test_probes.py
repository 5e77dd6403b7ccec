"""A quiet router probes its external engines rarely, a busy one scrapes load at the
configured rate and asks `/health` only of engines that are not streaming:
`ProbeGate` alone, then a router in front of a real serve-replica engine."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from kvroute.router.service.probes import ProbeGate
from kvroute.router.service.router_service import RouterService
from tests.replicas.serve_helpers import events_json, serve_replica, tiny_config
from tests.replicas.test_serve_replica import free_port
from tests.router.engine_proxy import engine_proxy
from tests.router.test_stalls import _config, _with_service, stream_through

pytestmark = pytest.mark.timeout(120)


def test_a_quiet_gate_lets_each_probe_through_once_per_period() -> None:
    gate = ProbeGate(quiet_every_s=10.0)
    assert [gate.due("load", t) for t in (0.0, 1.0, 9.9, 10.0, 15.0)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    # Each probe keeps its own period.
    assert gate.due("health", 15.0) and not gate.due("health", 16.0)


def test_every_probe_is_due_while_a_request_is_in_flight_and_for_a_period_after() -> None:
    gate = ProbeGate(quiet_every_s=10.0)
    assert gate.due("load", 0.0)
    gate.begin(1.0)
    assert [gate.due("load", t) for t in (2.0, 3.0, 100.0)] == [True, True, True]
    gate.end(100.0)
    assert gate.due("load", 105.0) and gate.due("load", 109.9)
    assert not gate.quiet(109.9) and gate.quiet(110.0)
    assert not gate.due("load", 110.0)  # quiet, and the last load probe was at 109.9


def test_a_quiet_router_probes_rarely_a_busy_one_scrapes_often_and_trusts_streamed_tokens(
    tmp_path: Path,
) -> None:
    events, port = free_port(), free_port()
    seen: Counter[str] = Counter()
    with serve_replica(tiny_config(tmp_path, step_s=0.02), events_json(events)) as server:

        async def scenario() -> tuple[Counter[str], Counter[str]]:
            proxy = await engine_proxy(server.url, seen=seen)
            await web.TCPSite(proxy, "127.0.0.1", port).start()
            config = _config(
                [(f"http://127.0.0.1:{port}", events)],
                engine_load_poll_s=0.1,
                supervise_s=0.1,
                engine_quiet_probe_s=1.5,
            )

            async def idle_then_busy(service: RouterService) -> tuple[Counter[str], Counter[str]]:
                seen.clear()
                await asyncio.sleep(1.0)  # quiet: at most one probe of each
                idle = Counter(seen)
                seen.clear()
                for i in range(4):  # about 1 s of streaming at 20 ms a token
                    await stream_through(service, f"busy {i}", max_tokens=12)
                return idle, Counter(seen)

            try:
                return await _with_service(config, idle_then_busy)
            finally:
                await proxy.cleanup()

        idle, busy = asyncio.run(scenario())
    assert idle["/metrics"] <= 1 and idle["/health"] <= 1
    assert busy["/v1/completions"] == 4
    assert busy["/metrics"] >= 5
    # Streaming proves the engine healthy: at most the check before its first token.
    assert busy["/health"] <= 1
