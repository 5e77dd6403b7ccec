"""Aggregate a simulation run into the numbers the quality report prints."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from kvroute.benchmarks.sim.simulator import SimResult


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class RunMetrics:
    workload: str
    policy: str
    requests: int
    rejected: int
    hit_rate: float
    predicted_rate: float
    ttft_mean: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    latency_mean: float
    latency_p90: float
    throughput_rps: float
    imbalance: float
    duplication: float
    preemptions: int
    sim_time_s: float
    wall_time_s: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def summarize(result: SimResult) -> RunMetrics:
    records = result.records
    prompt = sum(r.prompt_tokens for r in records)
    ttfts = [r.ttft_s for r in records]
    latencies = [r.latency_s for r in records]
    prefill = [rep.prefill_tokens for rep in result.replicas.values()]
    mean_prefill = statistics.mean(prefill) if prefill else 0.0
    span = max((r.finish_s for r in records), default=0.0) - min(
        (r.arrival_s for r in records), default=0.0
    )
    return RunMetrics(
        workload=result.workload,
        policy=result.config.policy,
        requests=len(records),
        rejected=len(result.rejected),
        hit_rate=sum(r.cached_tokens for r in records) / prompt if prompt else 0.0,
        predicted_rate=sum(r.predicted_tokens for r in records) / prompt if prompt else 0.0,
        ttft_mean=statistics.mean(ttfts) if ttfts else 0.0,
        ttft_p50=quantile(ttfts, 0.5),
        ttft_p90=quantile(ttfts, 0.9),
        ttft_p99=quantile(ttfts, 0.99),
        latency_mean=statistics.mean(latencies) if latencies else 0.0,
        latency_p90=quantile(latencies, 0.9),
        throughput_rps=len(records) / span if span > 0 else 0.0,
        imbalance=max(prefill) / mean_prefill if mean_prefill else 0.0,
        duplication=result.duplication,
        preemptions=sum(rep.preemptions for rep in result.replicas.values()),
        sim_time_s=result.sim_time_s,
        wall_time_s=result.wall_time_s,
    )
