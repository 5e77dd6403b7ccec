"""Quality benchmark: every policy on real traces and synthetic workloads, in the
simulator, against honest bounds, with tables, JSON and plots.

For each workload and trace speed, each policy replays the same requests on
the same simulated cluster. Beside every result stand three bounds on the
token hit rate: the infinite cache, one pooled LRU cache of R x C blocks
(the practical ceiling for LRU replicas), and the same pooled cache with
Belady's optimal eviction (no router can beat it).

Run: python -m benchmarks.quality [--workloads conversation,synthetic] [--speeds 1.5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvroute.benchmarks.sim.bounds import (
    belady_hit_rate,
    infinite_cache_hit_rate,
    pooled_lru_hit_rate,
)
from kvroute.benchmarks.sim.config import BenchConfig, load_bench_config
from kvroute.benchmarks.sim.generators import (
    agentic_tool_loops,
    generated_shared_prefix,
    multi_tenant,
    multi_turn_chat,
)
from kvroute.benchmarks.sim.metrics import RunMetrics, summarize
from kvroute.benchmarks.sim.simulator import Simulator
from kvroute.benchmarks.sim.traces import load_mooncake
from kvroute.benchmarks.sim.workload import Workload
from kvroute.configs import CONFIG_DIR
from kvroute.router.policy import POLICIES as ROUTING_POLICIES

POLICIES = tuple(ROUTING_POLICIES)  # every registered policy, in registration order
ROOT = Path(__file__).resolve().parent.parent


def workload_builders(limit: int | None) -> dict[str, Callable[[float], Workload]]:
    """Each workload at a given speed (1.0 = the trace's own pace)."""
    return {
        "conversation": lambda speed: load_mooncake("conversation", speed=speed, limit=limit),
        "synthetic": lambda speed: load_mooncake("synthetic", speed=speed, limit=limit),
        "tenants": lambda speed: multi_tenant(
            tenants=64,
            requests=limit or 3000,
            system_prompt_tokens=4096,
            question_tokens=256,
            output_tokens=128,
            zipf_s=1.1,
            rate=4.0 * speed,
            seed=0,
        ),
        "chat": lambda speed: multi_turn_chat(
            sessions=limit or 400,
            turns=6,
            system_tokens=1024,
            user_tokens=256,
            output_tokens=200,
            think_s=5.0,
            rate=0.6 * speed,
            seed=0,
        ),
        "agentic": lambda speed: agentic_tool_loops(
            agents=limit or 120,
            steps=6,
            fanout=3,
            system_tokens=4096,
            tool_tokens=512,
            output_tokens=96,
            think_s=0.5,
            rate=0.5 * speed,
            seed=0,
        ),
        "gsp": lambda speed: generated_shared_prefix(
            groups=64,
            prompts_per_group=16,
            system_tokens=2048,
            question_tokens=128,
            output_tokens=256,
            rate=3.0 * speed,
            seed=0,
        ),
    }


def compute_bounds(workload: Workload, config: BenchConfig, replicas: int) -> dict[str, float]:
    block_size = config.model.block_size
    capacity = replicas * config.model.num_blocks
    return {
        "infinite": infinite_cache_hit_rate(workload, block_size).rate,
        "pooled_lru": pooled_lru_hit_rate(workload, block_size, capacity).rate,
        "belady": belady_hit_rate(workload, block_size, capacity).rate,
    }


def format_table(name: str, speed: float, bounds: dict[str, float], runs: list[RunMetrics]) -> str:
    lru, opt = bounds["pooled_lru"], bounds["belady"]
    lines = [
        f"### {name} at {speed:g}x",
        "",
        f"Bounds: infinite cache {bounds['infinite']:.1%}, pooled LRU {lru:.1%}, Belady {opt:.1%}.",
        "",
        "| policy | hit rate | / LRU bound | / Belady | TTFT p50 | TTFT p90 | TTFT p99 | TTFT mean "
        "| latency mean | req/s | imbalance | dup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in runs:
        lines.append(
            f"| {m.policy} | {m.hit_rate:.1%} | {m.hit_rate / lru if lru else 0:.1%} | "
            f"{m.hit_rate / opt if opt else 0:.1%} | {m.ttft_p50:.3f} s | {m.ttft_p90:.3f} s | "
            f"{m.ttft_p99:.3f} s | {m.ttft_mean:.3f} s | {m.latency_mean:.2f} s | "
            f"{m.throughput_rps:.2f} | {m.imbalance:.2f} | {m.duplication:.2f} |"
        )
    return "\n".join(lines)


def plot(name: str, results: list[dict[str, Any]], bounds: dict[str, float], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit_ax, ttft_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = sorted({r["policy"] for r in results}, key=POLICIES.index)
    for policy in policies:
        rows = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["speed"])
        speeds = [r["speed"] for r in rows]
        hit_ax.plot(speeds, [r["hit_rate"] for r in rows], marker="o", label=policy)
        ttft_ax.plot(speeds, [r["ttft_p90"] for r in rows], marker="o", label=policy)
    for key, style in (("belady", ":"), ("pooled_lru", "--"), ("infinite", "-.")):
        hit_ax.axhline(
            bounds[key], color="black", linestyle=style, linewidth=1, label=f"{key} bound"
        )
    hit_ax.set(title=f"{name}: token hit rate", xlabel="trace speed (x)", ylabel="hit rate")
    ttft_ax.set(title=f"{name}: TTFT p90", xlabel="trace speed (x)", ylabel="seconds")
    ttft_ax.set_yscale("log")
    hit_ax.legend(fontsize=7)
    ttft_ax.legend(fontsize=7)
    return save_figure(fig, out / f"{name}.png")


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG_DIR / "bench.yaml"))
    parser.add_argument("--workloads", default="conversation,synthetic")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--speeds", default="1.5")
    parser.add_argument("--replicas", type=int, help="default: replicas.count in the config")
    parser.add_argument("--limit", type=int, help="only the first N requests of a trace")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-bounds", action="store_true", help="skip the bound computations")
    args = parser.parse_args(argv)

    config = load_bench_config(args.config)
    if args.replicas:
        config = config.with_replicas(args.replicas)
    replicas = config.replicas.count
    policies = [p for p in args.policies.split(",") if p]
    speeds = [float(s) for s in args.speeds.split(",") if s]
    builders = workload_builders(args.limit)
    unknown = [w for w in args.workloads.split(",") if w not in builders]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {sorted(builders)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    print(f"{command}\nparameters: {config.describe()}\n", flush=True)

    report: dict[str, Any] = {"command": command, "parameters": config.describe(), "workloads": {}}
    markdown = [f"# kvroute quality benchmark\n\n`{command}`\n\nParameters: {config.describe()}\n"]
    for name in args.workloads.split(","):
        started = time.perf_counter()
        base = builders[name](1.0)
        bounds = (
            {"infinite": 0.0, "pooled_lru": 0.0, "belady": 0.0}
            if args.no_bounds
            else compute_bounds(base, config, replicas)
        )
        print(
            f"{name}: {len(base.requests)} requests; bounds {bounds} "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        results: list[dict[str, Any]] = []
        for speed in speeds:
            workload = builders[name](speed)
            runs = []
            for policy in policies:
                result = Simulator(config.sim_config(policy, replicas), workload).run()
                metrics = summarize(result)
                runs.append(metrics)
                results.append({**metrics.as_dict(), "speed": speed})
                print(
                    f"  {policy:<13} {speed:g}x hit {metrics.hit_rate:.1%} "
                    f"TTFT p90 {metrics.ttft_p90:.3f} s  ({metrics.wall_time_s:.1f} s wall, "
                    f"{len(result.records) / metrics.wall_time_s:.0f} req/s simulated)",
                    flush=True,
                )
            table = format_table(name, speed, bounds, runs)
            markdown.append(table + "\n")
            print("\n" + table + "\n", flush=True)
        figure = plot(name, results, bounds, out)
        markdown.append(f"![{name}]({figure.name})\n")
        report["workloads"][name] = {"bounds": bounds, "runs": results, "plot": figure.name}
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    (out / "quality.md").write_text("\n".join(markdown))
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
