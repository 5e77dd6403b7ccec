"""Policy tuning: one workload, several router/replica variants, side by side.

A variant is `policy[:queue_weight[:probation_fraction[:reuse_memory]]]`: kv_aware's
weight of queued prefill relative to the prompt's own uncached tokens, then the
replicas' segmented-LRU probation fraction and the router's reuse-hint memory
(empty fields keep the config's value; `lru` as the fraction means plain LRU).

Run: python -m benchmarks.tuning --trace conversation --speed 1.5 --limit 4000 \
         kv_aware:0.5 kv_aware:0.3 kv_aware:0.15 kv_aware:0.15:0.6:0 kv_aware:0.15:0.6:2
"""

from __future__ import annotations

import argparse

import msgspec

from kvroute.benchmarks.sim.bounds import pooled_lru_hit_rate
from kvroute.benchmarks.sim.config import BenchConfig, load_bench_config
from kvroute.benchmarks.sim.metrics import summarize
from kvroute.benchmarks.sim.simulator import Simulator
from kvroute.benchmarks.sim.traces import load_mooncake
from kvroute.configs import CONFIG_DIR


def variant_config(config: BenchConfig, variant: str) -> tuple[BenchConfig, str, dict]:
    """The config, policy and policy options a variant string describes."""
    policy, weight, fraction, memory = [*variant.split(":"), "", "", ""][:4]
    replicas, router = config.replicas, config.router
    if fraction:
        replicas = msgspec.structs.replace(
            replicas, probation_fraction=None if fraction == "lru" else float(fraction)
        )
    if memory:
        router = msgspec.structs.replace(router, reuse_memory=float(memory))
    options = {"weights": {"queue_weight": float(weight)}} if weight else {}
    return msgspec.structs.replace(config, replicas=replicas, router=router), policy, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--trace", default="synthetic")
    parser.add_argument("--speed", type=float, default=1.5)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--config", default=str(CONFIG_DIR / "bench.yaml"))
    args = parser.parse_args()
    config = load_bench_config(args.config)
    workload = load_mooncake(args.trace, speed=args.speed, limit=args.limit)
    bound = pooled_lru_hit_rate(
        workload, config.model.block_size, config.model.num_blocks * config.replicas.count
    ).rate
    print(f"{args.trace} at {args.speed:g}x, first {args.limit} requests; {config.describe()}")
    print(f"pooled-LRU bound: {bound:.2%}\n")
    header = (
        f"{'variant':<22} {'hit':>6} {'/ LRU':>6} {'TTFT p50':>8} {'p90':>6} {'p99':>6} "
        f"{'mean':>6} {'imbalance':>9} {'dup':>5}"
    )
    print(header)
    print("-" * len(header))
    for variant in args.variants:
        variant_cfg, policy, options = variant_config(config, variant)
        result = Simulator(variant_cfg.sim_config(policy, **options), workload).run(progress=False)
        m = summarize(result)
        print(
            f"{variant:<22} {m.hit_rate:>6.1%} {m.hit_rate / bound:>6.1%} {m.ttft_p50:>8.2f} "
            f"{m.ttft_p90:>6.2f} {m.ttft_p99:>6.2f} {m.ttft_mean:>6.2f} {m.imbalance:>9.2f} "
            f"{m.duplication:>5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
