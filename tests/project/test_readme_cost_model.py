"""The README quotes the cost model configs/default.yaml carries, not an older fit."""

from __future__ import annotations

import re
from pathlib import Path

from kvroute.router.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_quotes_the_default_configs_cost_model() -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    match = re.search(
        r"constants fitted to its own model \(([\d,]+) prefill tokens/s, ([\d.]+) ms a step, "
        r"([\d.]+) ms per decoding sequence",
        text,
    )
    assert match is not None
    cost = load_config(REPO / "configs" / "default.yaml").replicas.cost
    assert float(match[1].replace(",", "")) == cost.prefill_tokens_per_s
    assert float(match[2]) / 1000 == cost.step_base_s
    assert float(match[3]) / 1000 == cost.decode_s_per_seq
