"""benchmarks.peers' pure parts: seeded workloads, the table's numbers, path names,
and CPU read from /proc over a whole process tree."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kvroute.benchmarks.peers import procs, report
from kvroute.benchmarks.peers.__main__ import scrape
from kvroute.benchmarks.peers.fleet import engine_cpus, start_fleet
from kvroute.benchmarks.peers.relay import build_app as relay_app
from kvroute.benchmarks.peers.routers import Spec, parse_spec
from kvroute.benchmarks.peers.workloads import GENERATORS, Scale, Workload, build
from kvroute.benchmarks.vllm_launch import http

SCALE = Scale(requests=12, sessions=4, engine_tokens=4096, engines=3)


def test_workloads_are_the_same_for_a_seed_and_differ_across_seeds() -> None:
    first = build(list(GENERATORS), SCALE, seed=3)
    again = build(list(GENERATORS), SCALE, seed=3)
    other = build(list(GENERATORS), SCALE, seed=4)
    assert first == again
    assert all(a.sessions != b.sessions for a, b in zip(first, other, strict=True))
    # One workload's prompts do not depend on which others are built with it.
    assert build(["chat"], SCALE, seed=3)[0] == first[1]


def test_workload_shapes_follow_the_scale() -> None:
    tenants, chat, agentic, pressure, hybrid = build(list(GENERATORS), SCALE, seed=0)
    assert tenants.requests == 12 and all(len(s) == 1 for s in tenants.sessions)
    assert len(chat.sessions) == 4 and all(3 <= len(s) <= 5 for s in chat.sessions)
    # Each later turn extends the one before it: the conversation is a prefix chain.
    for session in chat.sessions + agentic.sessions:
        assert all(b.startswith(a) for a, b in itertools.pairwise(session))
    # 8 hot 1,024-token prefixes: twice one engine's 4,096 tokens.
    heads = {p[:1024] for (p,) in pressure.sessions}
    assert len(heads) <= 8 and all(len(p) == 1024 + 4 + 32 for (p,) in pressure.sessions)
    assert hybrid.layout == "hybrid" and pressure.layout == "full"
    assert hybrid.sessions != pressure.sessions


def test_the_bound_counts_whole_blocks_seen_before_and_never_a_prompts_last_token() -> None:
    a, b = "a" * 40, "b" * 16
    workload = Workload(
        "w",
        "full",
        # `a` first: nothing seen. (a+b)'s 3 usable blocks: a's 2 seen, then one
        # (a's tail + b) never seen. The repeat of `a`: both its blocks seen. `b`
        # alone: its only block would hold its last token, which is never a hit.
        sessions=((a, a + b), (a,), (b,)),
        max_tokens=1,
        about="",
    )
    assert workload.bound(block_size=16) == (0 + 32 + 32 + 0) / (40 + 56 + 40 + 16)


def test_the_bound_is_what_kvroute_reached_on_the_committed_vllm_runs() -> None:
    full = Scale(requests=48, sessions=12, engine_tokens=4096, engines=3)
    tenants, pressure = build(["tenants", "pressure"], full, seed=0)
    # benchmarks/results/peers/vllm-full: kvroute kv_aware 80.1% and 80.5%.
    assert (round(tenants.bound(), 3), round(pressure.bound(), 3)) == (0.801, 0.805)


def test_pinned_engines_get_a_core_each_and_too_many_are_refused() -> None:
    cores = sorted(os.sched_getaffinity(0))
    assert engine_cpus(2, pin=False) == [None, None]
    assert engine_cpus(1, pin=True) == [frozenset({cores[0]})]
    with pytest.raises(ValueError, match=rf"cannot pin {len(cores) + 1} engines to {len(cores)}"):
        engine_cpus(len(cores) + 1, pin=True)


def test_an_unknown_workload_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"unknown workload\(s\) \['nope'\]"):
        build(["tenants", "nope"], SCALE, seed=0)


def test_path_specs_parse_router_policy_and_kvroute_options() -> None:
    assert parse_spec("direct") == Spec("direct", "round_robin")
    assert parse_spec("vllm-router") == Spec("vllm-router", "cache_aware")
    spec = parse_spec("kvroute:kv_aware:load_poll_s=0.5,prediction_ttl_s=2")
    assert spec == Spec("kvroute", "kv_aware", {"load_poll_s": 0.5, "prediction_ttl_s": 2})
    assert spec.label == "kvroute kv_aware (load_poll_s=0.5,prediction_ttl_s=2)"
    with pytest.raises(ValueError, match="unknown router 'nginx'"):
        parse_spec("nginx")
    with pytest.raises(ValueError, match="sglang-router takes none"):
        parse_spec("sglang-router:cache_aware:x=1")
    with pytest.raises(ValueError, match="write KEY=VALUE"):
        parse_spec("kvroute:kv_aware:load_poll_s")
    assert parse_spec("relay") == Spec("relay", "round_robin")
    assert parse_spec("relay").label == "relay"
    with pytest.raises(ValueError, match="`relay` takes no policy"):
        parse_spec("relay:cache_aware")


def test_the_relay_passes_each_engines_bytes_through_in_turn() -> None:
    """Two upstream HTTP servers; the relay sends request i to server i mod 2 and
    returns its status, headers and streamed body byte for byte."""

    def upstream(name: str) -> web.Application:
        async def stream(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            response = web.StreamResponse(status=201, headers={"X-Engine": name})
            await response.prepare(request)
            for piece in (b"data: ", name.encode(), b" ", body, b"\n\n"):
                await response.write(piece)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", stream)
        return app

    async def scenario() -> list[tuple[int, str, bytes]]:
        servers = [TestServer(upstream(name)) for name in ("a", "b")]
        for server in servers:
            await server.start_server()
        relay = TestServer(relay_app([str(server.make_url("")).rstrip("/") for server in servers]))
        await relay.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                seen = []
                for i in range(3):
                    url = relay.make_url("/v1/completions")
                    async with session.post(url, data=f"q{i}".encode()) as response:
                        seen.append(
                            (response.status, response.headers["X-Engine"], await response.read())
                        )
                return seen
        finally:
            await relay.close()
            for server in servers:
                await server.close()

    assert asyncio.run(scenario()) == [
        (201, "a", b"data: a q0\n\n"),
        (201, "b", b"data: b q1\n\n"),
        (201, "a", b"data: a q2\n\n"),
    ]


def test_engine_counters_sum_vllms_totals_over_label_sets() -> None:
    text = (
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 48.0\n'
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 16.0\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0\n'
        'vllm:request_success_total{engine="0",model_name="m"} 3.0\n'
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 999.0\n'
        "# TYPE vllm:time_to_first_token_seconds histogram\n"
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf"} 3.0\n'
        'vllm:time_to_first_token_seconds_count{engine="0"} 3.0\n'
        'vllm:time_to_first_token_seconds_sum{engine="0"} 0.75\n'
    )
    assert report.engine_counters(text) == report.EngineCounters(64.0, 100.0, 3.0, 0.75, 3.0)


def _run(path: str, round_: int, hits: float, ttfts: list[float], **kw: object) -> report.Run:
    fields: dict[str, object] = {
        "workload": "w",
        "path": path,
        "round": round_,
        "ok": len(ttfts),
        "failed": 0,
        "seconds": 2.0,
        "ttfts": ttfts,
        "e2es": [t + 0.1 for t in ttfts],
        "hits": hits,
        "queries": 100.0,
        "per_engine": [2.0, 1.0, 1.0],
        "router_cpu_s": 0.04,
        "router_idle": 0.1,
        "engines_idle": 0.02,
    }
    fields.update(kw)
    return report.Run(**fields)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    values = [0.4, 0.1, 0.3, 0.2]
    assert report.percentile(values, 0.5) == 0.2
    assert report.percentile(values, 0.9) == 0.4
    assert report.percentile(values, 0.0) == 0.1
    assert report.percentile([], 0.9) == 0.0


def test_rows_are_medians_over_runs_with_the_run_to_run_spread() -> None:
    runs = [
        _run("kvroute kv_aware", 0, 80.0, [0.1, 0.2, 0.3, 0.4]),
        _run("kvroute kv_aware", 1, 90.0, [0.1, 0.2, 0.3, 0.6], failed=1, notes={"a": 1}),
        _run("kvroute kv_aware", 2, 85.0, [0.1, 0.2, 0.3, 0.5], notes={"a": 2, "b": 1}),
        _run("direct", 0, 40.0, [0.5, 0.5, 0.5, 0.5], engine_ttft_s=0.3),
    ]
    mine, direct = report.summarize(runs)
    assert (mine.runs, mine.ok, mine.failed) == (3, 12, 1)
    assert mine.hit_rate == pytest.approx(0.85) and mine.hit_spread == pytest.approx(0.1)
    assert mine.ttft_p90 == pytest.approx(0.5) and mine.ttft_p90_spread == pytest.approx(0.2)
    assert mine.throughput == 2.0
    # 40 ms of router CPU over 4, 5 and 4 requests: 10, 8 and 10 ms.
    assert mine.router_cpu_ms_per_request == pytest.approx(10.0)
    assert mine.per_engine == [2.0, 1.0, 1.0]
    assert mine.notes == {"a": 3, "b": 1} and not mine.clean
    assert direct.router_cpu_ms_per_request is None and direct.router_idle is None
    table = report.table([mine, direct])
    assert "| w | kvroute kv_aware | 12 / 1 | 85.0% (±5.0%) | 200 / 500 / 500 |" in table
    assert table.splitlines()[2].endswith("| 2 / 1 / 1 | a x3; b x1 |")
    assert "| w | direct | 4 / 0 | 40.0% (±0.0%) |" in table
    # Client mean TTFT beside the engines' own (which only vLLM reports).
    assert mine.ttft_mean == pytest.approx(0.275) and mine.engine_ttft_mean is None
    assert "| 200 | 275 / – |" in table and "| 0 | 500 / 300 |" in table


def test_a_degraded_peer_is_never_the_best_peer() -> None:
    rows = report.summarize(
        [
            _run("vllm-router cache_aware", 0, 95.0, [0.1], notes={"routing tokens: x": 3}),
            _run("sglang-router cache_aware", 0, 70.0, [0.2]),
            _run("kvroute kv_aware", 0, 90.0, [0.1]),
        ]
    )
    best = report.best_peer(rows, "w")
    assert best is not None and best.path == "sglang-router cache_aware"
    assert "kvroute kv_aware hit 90.0% vs sglang-router cache_aware 70.0% (+20.0 pts)" in (
        report.verdicts(rows)
    )
    # With the workload's bound, each path's share of it comes first.
    assert report.verdicts(rows, {"w": 0.9}).splitlines()[0] == (
        "- w: a cache that never evicts would hit 90.0%; share of it reached: "
        "vllm-router cache_aware 105.6%, sglang-router cache_aware 77.8%, "
        "kvroute kv_aware 100.0%"
    )


def test_of_peers_tied_on_hit_rate_the_faster_one_is_the_best_peer() -> None:
    rows = report.summarize(
        [
            _run("vllm-router cache_aware", 0, 64.4, [0.9, 1.1]),
            _run("sglang-router cache_aware", 0, 64.4, [0.4, 0.6]),
            _run("kvroute kv_aware", 0, 64.4, [0.5]),
        ]
    )
    best = report.best_peer(rows, "w")
    assert best is not None and best.path == "sglang-router cache_aware"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = report.summarize([_run("direct", 0, 40.0, [0.5]), _run("kvroute x", 0, 90.0, [0.1])])
    report.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tree_cpu_counts_a_busy_grandchild_and_stop_leaves_nothing(tmp_path: Path) -> None:
    # A shell whose child spins: the CPU is the grandchild's, not the root's.
    spin = f"{sys.executable} -c 'while True: pass' & wait"
    launched = procs.Launched(["sh", "-c", spin], tmp_path / "spin.log")
    try:
        deadline = time.monotonic() + 10
        while len(procs.tree(launched.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = procs.tree(launched.pid)
        assert len(members) == 2 and members[0] == launched.pid
        before = procs.cpu_seconds([launched.pid])
        deadline = time.monotonic() + 10
        while procs.cpu_seconds([launched.pid]) - before < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.cpu_seconds([launched.pid]) - before >= 0.2
        launched.pause()
        paused = procs.cpu_seconds([launched.pid])
        time.sleep(0.3)
        # Stopped: at most the tick that was being accounted when the signal landed.
        assert procs.cpu_seconds([launched.pid]) - paused <= 0.02
        launched.resume()
    finally:
        launched.stop()
    # Gone (a zombie waiting for init to reap it counts as gone).
    assert all(procs.tree(pid) == [] for pid in members)


@pytest.mark.slow
def test_a_reset_empties_the_engines_cache_and_steps_each_engine_once(tmp_path: Path) -> None:
    fleet = start_fleet("serve-replica", "full", 1, "simulated", tmp_path, python="unused")
    try:
        url = fleet.urls[0]
        body = {"model": fleet.model, "prompt": "abcdefgh" * 8, "max_tokens": 1}
        http(f"{url}/v1/completions", body, timeout=60)
        http(f"{url}/v1/completions", body, timeout=60)
        (warm,) = scrape(fleet)
        assert warm.hits == 48 and warm.requests == 2  # 3 of the 4 blocks, short of the last
        fleet.reset_prefix_caches()
        (reset,) = scrape(fleet)
        # The single-token request that makes the engine publish its clear: it ran,
        # and, shorter than a block, found and left nothing.
        assert reset.requests == 3 and reset.hits == 48
        http(f"{url}/v1/completions", body, timeout=60)
        (after,) = scrape(fleet)
        assert after.hits == 48 and after.queries - reset.queries == 64
    finally:
        fleet.stop()


def test_vllm_engines_refuse_the_hybrid_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="full attention only, not 'hybrid'"):
        start_fleet("vllm", "hybrid", 3, "torch", tmp_path, python="unused")
