"""From runs to one table: medians over a path's runs, with the run-to-run spread.

Pure functions of the measurements, so the test can check every number. A row with
notes (failed requests, a degraded peer) is never named best.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class EngineCounters:
    """Totals one engine reports on /metrics (vLLM's names). `ttft_*` is vLLM's own
    time-to-first-token histogram (from the request's arrival at the engine), which
    serve-replica does not export: 0 there."""

    hits: float = 0.0
    queries: float = 0.0
    requests: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0


def engine_counters(text: str) -> EngineCounters:
    """`vllm:prefix_cache_hits`, `..._queries`, `vllm:request_success` and the
    `vllm:time_to_first_token_seconds` sum and count, summed over label sets, from
    one /metrics page."""
    out = EngineCounters()
    names = {
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:request_success_total": "requests",
        "vllm:time_to_first_token_seconds_sum": "ttft_sum",
        "vllm:time_to_first_token_seconds_count": "ttft_count",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                attr = names[sample.name]
                setattr(out, attr, getattr(out, attr) + sample.value)
    return out


@dataclass
class Run:
    """One path through one workload once."""

    workload: str
    path: str
    round: int
    ok: int
    failed: int
    seconds: float
    ttfts: list[float]
    e2es: list[float]
    hits: float  # engine prefix-cache hit tokens during the run, all engines
    queries: float
    per_engine: list[float]  # requests each engine answered
    router_cpu_s: float  # the router's whole process tree during the run
    router_idle: float  # cores the router used while idle, before the run
    engines_idle: float  # cores all engines together used meanwhile
    notes: dict[str, int] = field(default_factory=dict)  # degraded-mode events by kind
    samples: list[str] = field(default_factory=list)  # e.g. the first warning logged
    # Mean TTFT the engines measured themselves (None: they do not export it); the
    # client's mean less this is what the path in front of them added.
    engine_ttft_s: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _totals(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for one in counts:
        for kind, n in one.items():
            out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items()))


def _notes(notes: dict[str, int]) -> str:
    return "; ".join(f"{kind} x{n}" for kind, n in notes.items())


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if values else 0.0


@dataclass
class Row:
    workload: str
    path: str
    runs: int
    ok: int
    failed: int
    hit_rate: float
    hit_spread: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    ttft_p90_spread: float
    ttft_mean: float
    engine_ttft_mean: float | None
    e2e_p50: float
    e2e_p90: float
    throughput: float
    router_cpu_ms_per_request: float | None
    router_idle: float | None
    engines_idle: float
    per_engine: list[float]
    notes: dict[str, int]  # totals over the runs

    @property
    def clean(self) -> bool:
        return not self.failed and not self.notes


def summarize(runs: list[Run]) -> list[Row]:
    """One row per (workload, path), in first-seen order: medians over its runs;
    `*_spread` is max - min over runs; ok/failed are totals."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.workload, run.path), []).append(run)
    rows = []
    for (workload, path), group in groups.items():
        med = statistics.median
        p90s = [percentile(r.ttfts, 0.9) for r in group]
        engine_ttfts = [r.engine_ttft_s for r in group]
        direct = path == "direct"
        rows.append(
            Row(
                workload=workload,
                path=path,
                runs=len(group),
                ok=sum(r.ok for r in group),
                failed=sum(r.failed for r in group),
                hit_rate=med(r.hit_rate for r in group),
                hit_spread=_spread([r.hit_rate for r in group]),
                ttft_p50=med(percentile(r.ttfts, 0.5) for r in group),
                ttft_p90=med(p90s),
                ttft_p99=med(percentile(r.ttfts, 0.99) for r in group),
                ttft_p90_spread=_spread(p90s),
                ttft_mean=med(statistics.fmean(r.ttfts) if r.ttfts else 0.0 for r in group),
                engine_ttft_mean=None if None in engine_ttfts else med(engine_ttfts),
                e2e_p50=med(percentile(r.e2es, 0.5) for r in group),
                e2e_p90=med(percentile(r.e2es, 0.9) for r in group),
                throughput=med(r.ok / r.seconds if r.seconds else 0.0 for r in group),
                router_cpu_ms_per_request=None
                if direct
                else med(1e3 * r.router_cpu_s / max(1, r.ok + r.failed) for r in group),
                router_idle=None if direct else med(r.router_idle for r in group),
                engines_idle=med(r.engines_idle for r in group),
                per_engine=[
                    med(r.per_engine[i] for r in group) for i in range(len(group[0].per_engine))
                ],
                notes=_totals(r.notes for r in group),
            )
        )
    return rows


def best_peer(rows: list[Row], workload: str, exclude: str = "kvroute") -> Row | None:
    """The clean non-kvroute row with the highest hit rate on `workload`; of peers
    tied on it, the one with the lowest TTFT p90 (the harder one to beat)."""
    peers = [r for r in rows if r.workload == workload and r.clean]
    peers = [r for r in peers if not r.path.startswith(exclude)]
    return max(peers, key=lambda r: (r.hit_rate, -r.ttft_p90), default=None)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


def table(rows: list[Row]) -> str:
    head = (
        "| workload | path | ok / failed | engine hit rate (spread) | TTFT p50 / p90 / p99 ms "
        "| TTFT p90 spread ms | mean TTFT client / engine ms | e2e p50 / p90 ms | req/s "
        "| router CPU ms/req | router idle CPU | engines idle CPU | requests per engine | notes |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        cpu = "–" if r.router_cpu_ms_per_request is None else f"{r.router_cpu_ms_per_request:.1f}"
        engine = "–" if r.engine_ttft_mean is None else _ms(r.engine_ttft_mean)
        idle = "–" if r.router_idle is None else f"{r.router_idle:.1%}"
        lines.append(
            f"| {r.workload} | {r.path} | {r.ok} / {r.failed} "
            f"| {r.hit_rate:.1%} (±{r.hit_spread / 2:.1%}) "
            f"| {_ms(r.ttft_p50)} / {_ms(r.ttft_p90)} / {_ms(r.ttft_p99)} "
            f"| {_ms(r.ttft_p90_spread)} | {_ms(r.ttft_mean)} / {engine} "
            f"| {_ms(r.e2e_p50)} / {_ms(r.e2e_p90)} "
            f"| {r.throughput:.1f} | {cpu} | {idle} | {r.engines_idle:.1%} "
            f"| {' / '.join(f'{n:g}' for n in r.per_engine)} | {_notes(r.notes)} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row], bounds: dict[str, float] | None = None) -> str:
    """Per workload, each kvroute row against the best clean peer: hit-rate points and
    TTFT p90, with the larger of the two rows' p90 spreads as the noise bar; with
    `bounds`, each workload's never-evicting cache's hit rate first."""
    lines = []
    for workload in dict.fromkeys(r.workload for r in rows):
        if bounds and workload in bounds:
            reached = ", ".join(
                f"{r.path} {r.hit_rate / bounds[workload]:.1%}"
                for r in rows
                if r.workload == workload and bounds[workload]
            )
            lines.append(
                f"- {workload}: a cache that never evicts would hit {bounds[workload]:.1%}; "
                f"share of it reached: {reached}"
            )
        peer = best_peer(rows, workload)
        for mine in (r for r in rows if r.workload == workload and r.path.startswith("kvroute")):
            if peer is None:
                lines.append(f"- {workload}: {mine.path}: no clean peer to compare with")
                continue
            noise = max(mine.ttft_p90_spread, peer.ttft_p90_spread)
            delta = mine.ttft_p90 - peer.ttft_p90
            ttft = "tie" if abs(delta) <= noise else ("lower" if delta < 0 else "higher")
            lines.append(
                f"- {workload}: {mine.path} hit {mine.hit_rate:.1%} vs {peer.path} "
                f"{peer.hit_rate:.1%} ({(mine.hit_rate - peer.hit_rate) * 100:+.1f} pts); "
                f"TTFT p90 {_ms(mine.ttft_p90)} vs {_ms(peer.ttft_p90)} ms "
                f"({ttft}, spread {_ms(noise)} ms)"
                + ("" if mine.clean else f"; not clean: {mine.failed} failed, {_notes(mine.notes)}")
            )
    return "\n".join(lines)


def plot(rows: list[Row], out: Path) -> None:
    """Hit rate and TTFT p90 per path, one group of bars per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    paths = list(dict.fromkeys(r.path for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 2 * len(workloads) + 4), 8))
    width = 0.8 / max(1, len(paths))
    for k, path in enumerate(paths):
        xs, hits, p90s, errs = [], [], [], []
        for w, workload in enumerate(workloads):
            row = next((r for r in rows if r.workload == workload and r.path == path), None)
            if row is not None:
                xs.append(w + k * width)
                hits.append(100 * row.hit_rate)
                p90s.append(1e3 * row.ttft_p90)
                errs.append(1e3 * row.ttft_p90_spread / 2)
        axes[0].bar(xs, hits, width, label=path)
        axes[1].bar(xs, p90s, width, yerr=errs, label=path)
    for ax, label in ((axes[0], "engine prefix-cache hit rate (%)"), (axes[1], "TTFT p90 (ms)")):
        ax.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def as_json(runs: list[Run], rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in runs]}
