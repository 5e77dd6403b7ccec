"""Summaries of a replayed workload, printed as tables."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunSummary:
    policy: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    predicted_tokens: int
    ttft_p50: float
    ttft_p90: float
    latency_mean: float
    per_replica: dict[str, int]
    wall_s: float

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def imbalance(self) -> float:
        """Busiest replica's request count over the mean."""
        counts = list(self.per_replica.values())
        return max(counts) / statistics.mean(counts) if counts else 0.0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summarize(
    policy: str, responses: list[dict[str, Any]], replicas: list[str], wall_s: float
) -> RunSummary:
    ttfts = [r["kvroute"]["ttft_s"] for r in responses]
    counts = Counter(r["kvroute"]["replica_id"] for r in responses)
    return RunSummary(
        policy=policy,
        requests=len(responses),
        prompt_tokens=sum(r["usage"]["prompt_tokens"] for r in responses),
        cached_tokens=sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in responses),
        predicted_tokens=sum(r["kvroute"]["predicted_hit_tokens"] for r in responses),
        ttft_p50=_quantile(ttfts, 0.5),
        ttft_p90=_quantile(ttfts, 0.9),
        latency_mean=statistics.mean(r["kvroute"]["latency_s"] for r in responses)
        if responses
        else 0.0,
        per_replica={replica: counts.get(replica, 0) for replica in replicas},
        wall_s=wall_s,
    )


def format_report(summaries: list[RunSummary]) -> str:
    lines = [
        f"{'policy':<12} {'requests':>8} {'hit rate':>8} {'predicted':>9} {'TTFT p50':>9} "
        f"{'TTFT p90':>9} {'latency':>8} {'imbalance':>9} {'req/s':>6}  requests per replica",
    ]
    lines.append("-" * (len(lines[0]) + 10))
    for s in summaries:
        predicted = s.predicted_tokens / s.prompt_tokens if s.prompt_tokens else 0.0
        spread = " ".join(f"{count}" for _, count in sorted(s.per_replica.items()))
        lines.append(
            f"{s.policy:<12} {s.requests:>8} {s.hit_rate:>8.1%} {predicted:>9.1%} "
            f"{s.ttft_p50 * 1e3:>7.1f}ms {s.ttft_p90 * 1e3:>7.1f}ms {s.latency_mean * 1e3:>6.0f}ms "
            f"{s.imbalance:>9.2f} {s.requests / s.wall_s:>6.1f}  {spread}"
        )
    return "\n".join(lines)
