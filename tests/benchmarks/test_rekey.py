"""benchmarks.rekey: both modes ingest the same engine events and end empty, and the
table states per-block cost and the tokens/seeded ratio."""

from __future__ import annotations

from kvroute.benchmarks.rekey import measure, table


def test_both_modes_apply_every_prompt_and_remove_it_again() -> None:
    best = measure(prompts=3, blocks=4, rounds=1)
    assert sorted(best) == ["seeded", "tokens"]
    assert all(store > 0 and remove > 0 for store, remove in best.values())


def test_the_table_gives_per_block_cost_and_the_ratio() -> None:
    rows = table({"seeded": (10e-6, 10e-6), "tokens": (30e-6, 50e-6)}, blocks=4).splitlines()
    assert rows[2] == "| seeded | 10.0 | 10.0 | 5.00 |"
    assert rows[3] == "| tokens | 30.0 | 50.0 | 20.00 |"
    assert rows[4] == "| tokens / seeded | | | 4.00x |"
