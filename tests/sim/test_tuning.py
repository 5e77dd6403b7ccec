"""Variant strings of the tuning and eviction benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.benchmarks.eviction import gap_closed
from kvroute.benchmarks.sim.config import load_bench_config
from kvroute.benchmarks.tuning import variant_config

BENCH = load_bench_config(Path(__file__).resolve().parents[2] / "configs" / "bench.yaml")


def test_a_full_variant_sets_weight_eviction_and_hint_memory() -> None:
    config, policy, options = variant_config(BENCH, "kv_aware:0.15:0.6:2")
    assert policy == "kv_aware"
    assert options == {"weights": {"queue_weight": 0.15}}
    assert config.replicas.probation_fraction == 0.6
    assert config.router.reuse_memory == 2.0


def test_empty_fields_keep_the_config_and_lru_means_plain_lru() -> None:
    config, policy, options = variant_config(BENCH, "sglang_like")
    assert (policy, options, config) == ("sglang_like", {}, BENCH)
    config, _, options = variant_config(BENCH, "kv_aware::lru:0")
    assert options == {}
    assert config.replicas.probation_fraction is None
    assert config.router.reuse_memory == 0.0


def test_gap_closed_is_the_share_of_the_lru_to_belady_span() -> None:
    bounds = {"pooled_lru": 0.2, "belady": 0.4}
    assert gap_closed(0.25, bounds) == pytest.approx(0.25)
    assert gap_closed(0.18, bounds) == pytest.approx(-0.1)
    assert gap_closed(0.3, {"pooled_lru": 0.3, "belady": 0.3}) == 0.0


def test_a_replica_count_override_is_what_the_report_header_says() -> None:
    from kvroute.benchmarks.sim.config import load_bench_config
    from kvroute.configs import CONFIG_DIR

    config = load_bench_config(CONFIG_DIR / "bench.yaml").with_replicas(4)
    assert config.describe().startswith("4 replicas x ")
    assert config.sim_config("kv_aware").replicas == 4
    with pytest.raises(ValueError, match="replicas must be >= 1, got 0"):
        config.with_replicas(0)
