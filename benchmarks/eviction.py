"""Eviction hints: how far past the pooled-LRU bound kv_aware gets toward Belady.

The same kv_aware router on the same traces, with three kinds of replicas:
vLLM's LRU, segmented LRU protecting only blocks that were hit, and segmented
LRU with the router's reuse hints (prefixes it saw before, anywhere in the
cluster). Beside each: the pooled-LRU and Belady bounds and the share of the
gap between them that the run closes, (hit - LRU bound) / (Belady - LRU bound).

Run: python -m benchmarks.eviction [--workloads conversation,synthetic] [--speed 1.5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kvroute.benchmarks.quality import ROOT, compute_bounds, save_figure, workload_builders
from kvroute.benchmarks.sim.config import load_bench_config
from kvroute.benchmarks.sim.metrics import summarize
from kvroute.benchmarks.sim.simulator import Simulator
from kvroute.benchmarks.tuning import variant_config
from kvroute.configs import CONFIG_DIR

# (label, tuning variant: policy:queue_weight:probation_fraction:reuse_memory)
VARIANTS = (
    ("LRU (vLLM)", "kv_aware::lru:0"),
    ("segmented LRU, hits only", "kv_aware::0.6:0"),
    ("segmented LRU + router hints", "kv_aware::0.6:2"),
)


def gap_closed(hit_rate: float, bounds: dict[str, float]) -> float:
    span = bounds["belady"] - bounds["pooled_lru"]
    return (hit_rate - bounds["pooled_lru"]) / span if span > 0 else 0.0


def plot(results: dict[str, dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        labels = [run["variant"] for run in result["runs"]]
        ax.bar(range(len(labels)), [run["hit_rate"] for run in result["runs"]], color="tab:blue")
        bounds = result["bounds"]
        for key, style in (("belady", ":"), ("pooled_lru", "--")):
            ax.axhline(bounds[key], color="black", linestyle=style, label=f"{key} bound")
        ax.set_xticks(range(len(labels)), labels, rotation=12, fontsize=7)
        low = min(bounds["pooled_lru"], *(run["hit_rate"] for run in result["runs"]))
        ax.set_ylim(low * 0.9, bounds["belady"] * 1.03)
        ax.set(title=f"{name} at {result['speed']:g}x: kv_aware hit rate", ylabel="hit rate")
        ax.legend(fontsize=7)
    return save_figure(fig, out / "eviction.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG_DIR / "bench.yaml"))
    parser.add_argument("--workloads", default="conversation,synthetic")
    parser.add_argument("--speed", type=float, default=1.5)
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eviction-hints"))
    args = parser.parse_args(argv)
    config = load_bench_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.eviction", shlex.join(argv or sys.argv[1:])])
    lines = ["# Eviction hints: kv_aware past the pooled-LRU bound", "", f"`{command.strip()}`", ""]
    lines += [
        f"Parameters: {config.describe()}. Each row overrides the replicas' eviction "
        "(`replicas.probation_fraction`: none, 0.6, 0.6) and the router's hint memory "
        "(`router.reuse_memory`: 0, 0, 2x the cluster cache).",
        "",
    ]
    builders = workload_builders(args.limit)
    results: dict[str, dict] = {}
    for name in args.workloads.split(","):
        workload = builders[name](args.speed)
        bounds = compute_bounds(workload, config, config.replicas.count)
        runs = []
        for label, variant in VARIANTS:
            variant_cfg, policy, options = variant_config(config, variant)
            result = Simulator(variant_cfg.sim_config(policy, **options), workload).run()
            m = summarize(result)
            runs.append(
                {
                    "variant": label,
                    "hit_rate": m.hit_rate,
                    "gap_closed": gap_closed(m.hit_rate, bounds),
                    "ttft_p50": m.ttft_p50,
                    "ttft_p90": m.ttft_p90,
                    "ttft_mean": m.ttft_mean,
                    "duplication": m.duplication,
                }
            )
            print(f"  {name} {label:<30} hit {m.hit_rate:.1%} TTFT p90 {m.ttft_p90:.3f} s")
        results[name] = {"speed": args.speed, "bounds": bounds, "runs": runs}
        lines += [
            f"### {name} at {args.speed:g}x",
            "",
            f"Bounds: pooled LRU {bounds['pooled_lru']:.1%}, Belady {bounds['belady']:.1%}.",
            "",
            "| replicas evict by | hit rate | / LRU bound | gap to Belady closed | TTFT p50 "
            "| TTFT p90 | TTFT mean |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['variant']} | {r['hit_rate']:.1%} | {r['hit_rate'] / bounds['pooled_lru']:.1%} "
            f"| {r['gap_closed']:.1%} | {r['ttft_p50']:.3f} s | {r['ttft_p90']:.3f} s "
            f"| {r['ttft_mean']:.3f} s |"
            for r in runs
        ]
        lines.append("")
    lines.append(f"![eviction]({plot(results, out).name})")
    (out / "eviction.md").write_text("\n".join(lines) + "\n")
    (out / "eviction.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
