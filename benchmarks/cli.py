"""`kvroute bench`: a command the benchmarks add to the CLI through an entry point.

kvroute's own CLI names no benchmark module: it loads every `kvroute.commands` entry
point, and this one (declared in pyproject.toml) adds `bench`. The simulator's
plots need the `bench` extra (matplotlib); without it the command says so.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from kvroute.configs import resolve_config


def add_bench_command(sub: Any) -> None:
    """Add `bench` to the CLI's subcommands (an argparse subparsers object)."""
    bench = sub.add_parser("bench", help="simulate policies on a trace against bounds")
    bench.add_argument("--trace", default="conversation", help="comma-separated workloads")
    bench.add_argument("--replicas", type=int, help="default: replicas.count in the config")
    bench.add_argument("--speed", default="1.5", help="comma-separated trace speeds")
    bench.add_argument("--policies", help="comma-separated (default: every registered policy)")
    bench.add_argument("--limit", type=int, help="only the first N requests")
    bench.add_argument("--config", default="bench", help="benchmark parameters: path or name")
    bench.add_argument("--out", default="kvroute-bench", help="results folder (created)")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Simulate every policy on a trace or workload (benchmarks/quality.py). The plots
    need matplotlib: without the `bench` extra this says so before simulating."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(
            "error: kvroute bench draws its plots with matplotlib: "
            "pip install 'kvroute[bench]' first"
        )
    from kvroute.benchmarks.quality import main as quality_main
    from kvroute.router.policy import POLICIES

    argv = [
        f"--workloads={args.trace}",
        f"--speeds={args.speed}",
        f"--policies={args.policies or ','.join(POLICIES)}",
        f"--out={args.out}",
        f"--config={resolve_config(args.config)}",
    ]
    if args.replicas:
        argv.append(f"--replicas={args.replicas}")
    if args.limit:
        argv.append(f"--limit={args.limit}")
    return quality_main(argv)
