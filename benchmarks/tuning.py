"""Policy tuning: one workload, several policy variants, side by side.

A variant is `policy` or `policy:queue_weight` (kv_aware's weight of queued
prefill relative to the prompt's own uncached tokens).

Run: python -m benchmarks.tuning --trace synthetic --speed 1.5 --limit 2000 \
         kv_aware:1.0 kv_aware:0.5 kv_aware:0.25 prefix_only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.sim.config import load_bench_config
from benchmarks.sim.metrics import summarize
from benchmarks.sim.simulator import Simulator
from benchmarks.sim.traces import load_mooncake

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--trace", default="synthetic")
    parser.add_argument("--speed", type=float, default=1.5)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench.yaml"))
    args = parser.parse_args()
    config = load_bench_config(args.config)
    workload = load_mooncake(args.trace, speed=args.speed, limit=args.limit)
    print(f"{args.trace} at {args.speed:g}x, first {args.limit} requests; {config.describe()}\n")
    header = (
        f"{'variant':<16} {'hit':>6} {'TTFT p50':>8} {'p90':>6} {'p99':>6} {'mean':>6} "
        f"{'imbalance':>9} {'dup':>5}"
    )
    print(header)
    print("-" * len(header))
    for variant in args.variants:
        policy, _, weight = variant.partition(":")
        options = {"weights": {"queue_weight": float(weight)}} if weight else {}
        result = Simulator(config.sim_config(policy, **options), workload).run(progress=False)
        m = summarize(result)
        print(
            f"{variant:<16} {m.hit_rate:>6.1%} {m.ttft_p50:>8.2f} {m.ttft_p90:>6.2f} "
            f"{m.ttft_p99:>6.2f} {m.ttft_mean:>6.2f} {m.imbalance:>9.2f} {m.duplication:>5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
