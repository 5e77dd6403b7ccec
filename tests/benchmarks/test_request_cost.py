"""benchmarks.request_cost's arithmetic: base, per-token slope and events, from the
medians of each cell."""

from __future__ import annotations

import yaml

from kvroute.benchmarks.request_cost import LONG_TOKENS, _engine_yaml, table


def _cells(base: float, per_token: float, events: float) -> dict[str, list[float]]:
    long = base + (LONG_TOKENS - 1) * per_token
    return {
        "repeated-1": [base, base * 2, base / 2],  # median: base
        f"repeated-{LONG_TOKENS}": [long],
        "new-1": [base + events],
    }


def test_the_table_splits_each_path_into_base_per_token_and_events() -> None:
    results = {
        "direct": _cells(0.0, 0.0, 0.0),
        "relay": _cells(1e-3, 100e-6, 0.0),
        "kvroute": _cells(3e-3, 200e-6, 1e-3),
    }
    rows = table(results).splitlines()
    assert rows[3] == "| relay | 1.00 | 100.0 | 0.00 | 1.50 |"
    assert rows[4] == "| kvroute | 3.00 | 200.0 | 1.00 | 5.00 |"
    assert rows[5] == "| kvroute - relay | +2.00 | +100.0 | +1.00 | +3.50 |"


def test_the_engine_has_one_full_attention_group() -> None:
    groups = yaml.safe_load(_engine_yaml())["model"]["groups"]
    assert [group["kind"] for group in groups] == ["full_attention"]
