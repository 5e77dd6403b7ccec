"""Pure parts of benchmarks.tier, serve_eval and scale: summaries, tables, projection."""

from __future__ import annotations

import os

import pytest

from kvroute.benchmarks.scale import EngineEvents, IngestRate, MemoryRow, RequestCost, projection
from kvroute.benchmarks.tier import Round, process_cpu_s, render_table, summarize, tier_config
from kvroute.configs import CONFIG_DIR
from kvroute.router.config import load_config


def test_summarize_takes_medians_and_ratios_against_the_base() -> None:
    results = {
        "direct": [
            Round(100.0, [0.010] * 100, {"client": 0.1}),
            Round(120.0, [0.012] * 100, {"client": 0.3}),
            Round(110.0, [0.011] * 100, {"client": 0.2}),
        ],
        "1 router": [
            Round(50.0, [0.020] * 100, {"client": 0.1, "router": 0.4}),
            Round(60.0, [0.022] * 100, {"client": 0.1, "router": 0.2}),
            Round(55.0, [0.021] * 100, {"client": 0.1, "router": 0.3}),
        ],
    }
    direct, routed = summarize(results, "direct")
    assert direct.rate == 110.0 and direct.rate_vs_base == 1.0
    assert direct.p50_ms == pytest.approx(11.0)
    assert direct.cpu_ms_per_request == {"client": pytest.approx(2.0)}
    assert routed.rate_vs_base == pytest.approx(0.5)
    assert routed.added_p50_ms == pytest.approx(10.0)
    assert routed.cpu_ms_per_request["router"] == pytest.approx(3.0)


def test_render_table_has_a_cpu_column_per_kind_and_dashes_where_unmeasured() -> None:
    results = {
        "a": [Round(10.0, [0.001], {"server": 0.001})],
        "b": [Round(5.0, [0.002], {"proxy": 0.002})],
    }
    table = render_table(summarize(results, "a"), "a").splitlines()
    assert table[0].endswith("| proxy CPU ms/req | server CPU ms/req |")
    assert table[2].startswith("| a | 10 | 100% |") and table[2].endswith("| - | 1.00 |")
    assert table[3].endswith("| 2.00 | - |")


def test_process_cpu_s_reads_this_process() -> None:
    assert process_cpu_s(os.getpid()) >= 0.0


def test_tier_config_gives_each_tier_its_namespace_routers_and_free_replicas() -> None:
    config = tier_config(load_config(CONFIG_DIR / "default.yaml"), routers=4, replicas=2)
    assert config.cluster.namespace == "tier-4-zmq"
    assert (config.router.count, config.router.http_port) == (4, 0)
    assert config.router.data_plane == "zmq"
    assert (config.replicas.count, config.replicas.executor) == (2, "simulated")
    assert config.replicas.cost.step_base_s == 0.0


def test_tier_config_over_ray_calls_has_a_namespace_of_its_own() -> None:
    config = tier_config(load_config(CONFIG_DIR / "default.yaml"), 1, 2, plane="ray")
    assert (config.cluster.namespace, config.router.data_plane) == ("tier-1-ray", "ray")


def test_projection_scales_the_measured_inputs() -> None:
    memory = [
        MemoryRow(64, 1000, 1, 64_000, 25.0, 25.0, 30.0),
        MemoryRow(1024, 100, 1, 102_400, 150.0, 150.0, 150.0),
        MemoryRow(1024, 100, 4, 25_600, 160.0, 40.0, 160.0),
    ]
    events = EngineEvents(
        trace="t",
        engines=8,
        requests=100,
        span_s=10.0,
        busy_fraction=0.5,
        batches_per_s=2.0,
        events_per_s=3.0,
        blocks_per_s=100.0,
        blocks_per_busy_s=200.0,
        blocks_per_computed_token=0.125,
        requests_per_s=0.5,
        mean_prompt_tokens=1000.0,
        removed_event_share=0.9,
        stored_blocks_per_event=50.0,
        removed_blocks_per_event=1.0,
    )
    costs = [RequestCost(8, 100.0, 50.0, 1000.0), RequestCost(1024, 100.0, 900.0, 1000.0)]
    got = projection(1024, 1 << 20, memory, events, IngestRate(1.0, 1.0, 1e6), costs)
    # Only the 1,024-replica rows count: their masks are as wide as 1,024 engines.
    assert got["index_gib_per_router"] == {"H=1": 150.0, "H=4": 40.0}
    assert got["max_blocks_per_engine_that_fit"]["H=1, 64 GiB"] == pytest.approx(
        64 * (1 << 30) / 150 / 1024
    )
    assert got["ingest_cores_saturated"] == pytest.approx(200.0 * 1024 / 1e6)
    assert got["requests_per_s"] == pytest.approx(512.0)
    assert got["routing_cores"] == pytest.approx(512.0 * 1000e-6)
