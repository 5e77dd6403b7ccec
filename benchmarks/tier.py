"""Router tier: requests/s and added latency of 1, 2 and 4 routers against direct calls.

One embedded local Ray holds one cluster per tier size, each in its own namespace
with its own replicas (a nearly free simulated executor, as in `benchmarks.cluster`,
so the serving path is measured, not a model) and `router.count` routers, each
serving HTTP on its own port. Every round runs each way in, in a rotated order, with
the same prompts and the same client concurrency:
- direct: the driver calls the 1-router cluster's replica actors round robin;
- N routers: `KVRouteClient` over the N routers' URLs (requests spread over them in
  turn), POST /v1/completions with one output token; with several `--data-planes`,
  a cluster per tier size and data plane (`router.data_plane`: ZeroMQ or Ray calls).

Every router of a tier ingests every replica's events, as in production. Besides
requests/s and latency, each way's CPU time is read from /proc for the routers, the
replicas and this driver (the client), so the CPU cost per request is known even
where the 2 cores, not the router, bound the rate. Figures are medians over rounds;
ratios are against direct in the same run.

Run: python -m benchmarks.tier [--quick] [--rounds 5 --requests 1000 --concurrency 32]
     [--tiers 1,2,4] [--data-planes zmq,ray]
Writes benchmarks/results/router-tier/live.md and live.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import ray
from tqdm import tqdm

from kvroute.benchmarks.cluster import drive, percentile
from kvroute.replicas.api import GenerateRequest
from kvroute.replicas.config import CostConfig
from kvroute.router.app.client import KVRouteClient
from kvroute.router.app.launch import Cluster, start_cluster
from kvroute.router.config import Config, load_config

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FREE = CostConfig(
    prefill_tokens_per_s=1e12, step_base_s=0.0, decode_s_per_seq=0.0, kv_read_s_per_block=0.0
)


@dataclass
class Round:
    """One way in, one round: its rate, its latencies and the CPU seconds it took."""

    rate: float
    latencies: list[float]
    cpu_s: dict[str, float]  # "router", "replica", "client" -> CPU seconds in the round


@dataclass
class Row:
    """One way in, summarized over rounds (medians)."""

    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    rate_vs_base: float
    added_p50_ms: float
    added_p99_ms: float
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)


def summarize(results: dict[str, list[Round]], base: str) -> list[Row]:
    """Medians over rounds for every way in; ratios and added latency against `base`."""

    def medians(runs: list[Round]) -> tuple[float, float, float]:
        return (
            statistics.median(r.rate for r in runs),
            statistics.median(percentile(r.latencies, 0.5) for r in runs),
            statistics.median(percentile(r.latencies, 0.99) for r in runs),
        )

    base_rate, base_p50, base_p99 = medians(results[base])
    rows = []
    for name, runs in results.items():
        rate, p50, p99 = medians(runs)
        kinds = sorted({kind for r in runs for kind in r.cpu_s})
        cpu = {
            kind: 1e3 * statistics.median(r.cpu_s.get(kind, 0.0) / len(r.latencies) for r in runs)
            for kind in kinds
        }
        rows.append(
            Row(
                name=name,
                rate=rate,
                p50_ms=p50 * 1e3,
                p99_ms=p99 * 1e3,
                rate_vs_base=rate / base_rate,
                added_p50_ms=(p50 - base_p50) * 1e3,
                added_p99_ms=(p99 - base_p99) * 1e3,
                cpu_ms_per_request=cpu,
            )
        )
    return rows


def render_table(rows: Sequence[Row], base: str) -> str:
    """A Markdown table of `rows`, with a CPU column per kind that any row measured."""
    kinds = sorted({kind for row in rows for kind in row.cpu_ms_per_request})
    header = [
        "path",
        "req/s",
        f"vs {base}",
        "p50 ms",
        "p99 ms",
        "added p50 ms",
        "added p99 ms",
        *(f"{kind} CPU ms/req" for kind in kinds),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.name,
            f"{row.rate:.0f}",
            f"{row.rate_vs_base:.0%}",
            f"{row.p50_ms:.2f}",
            f"{row.p99_ms:.2f}",
            f"{row.added_p50_ms:+.2f}",
            f"{row.added_p99_ms:+.2f}",
            *(
                f"{row.cpu_ms_per_request[k]:.2f}" if k in row.cpu_ms_per_request else "-"
                for k in kinds
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def actor_pid(handle: Any) -> int:
    return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()))


def tier_config(base: Config, routers: int, replicas: int, plane: str = "zmq") -> Config:
    """`base` with `routers` routers on free ports over `replicas` free simulated replicas,
    reached over data plane `plane`, in a namespace of its own."""
    return msgspec.structs.replace(
        base,
        cluster=msgspec.structs.replace(base.cluster, namespace=f"tier-{routers}-{plane}"),
        replicas=msgspec.structs.replace(
            base.replicas, count=replicas, cost=FREE, executor="simulated"
        ),
        router=msgspec.structs.replace(base.router, http_port=0, count=routers, data_plane=plane),
    )


class CpuMeter:
    """CPU seconds spent by named groups of processes between `start` and `stop`."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {kind: sum(process_cpu_s(p) for p in pids) for kind, pids in self.pids.items()}

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        return {kind: now[kind] - self._start[kind] for kind in now}


async def measure(args: argparse.Namespace) -> tuple[dict[str, list[Round]], dict[str, Any]]:
    base = load_config(args.config)
    tiers = [int(n) for n in args.tiers.split(",")]
    planes = args.data_planes.split(",")
    clusters: dict[str, Cluster] = {}
    try:
        for routers in tqdm(tiers, desc="clusters", unit="cluster"):
            for plane in planes:
                config = tier_config(base, routers, args.replicas, plane)
                clusters[_name(routers, plane, len(planes))] = start_cluster(config)
        # Every router indexes every replica before anything is timed.
        for cluster in clusters.values():
            ray.get([r.actor.wait_for_replicas.remote(args.replicas) for r in cluster.routers])
        return await _rounds(args, base, clusters)
    finally:
        for cluster in reversed(clusters.values()):  # the first one owns Ray
            cluster.stop()


async def _rounds(
    args: argparse.Namespace, base: Config, clusters: dict[str, Cluster]
) -> tuple[dict[str, list[Round]], dict[str, Any]]:
    rng = random.Random(0)
    prompts = [
        [rng.randrange(base.model.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(64)
    ]
    first = next(iter(clusters.values()))
    direct_replicas = first.replicas
    driver = os.getpid()
    meters: dict[str, CpuMeter] = {
        # The direct path's router does no routing, only ingest of the events it causes.
        "direct": CpuMeter(
            {
                "router": [actor_pid(h.actor) for h in first.routers],
                "replica": [actor_pid(h) for h in direct_replicas],
                "client": [driver],
            }
        )
    }
    for name, cluster in clusters.items():
        meters[name] = CpuMeter(
            {
                "router": [actor_pid(h.actor) for h in cluster.routers],
                "replica": [actor_pid(h) for h in cluster.replicas],
                "client": [driver],
            }
        )
    counter = 0

    async def direct(i: int) -> None:
        nonlocal counter
        counter += 1
        replica = direct_replicas[i % len(direct_replicas)]
        await replica.generate.remote(GenerateRequest(f"tier-{counter}", prompts[i % 64], 1))

    results: dict[str, list[Round]] = {name: [] for name in meters}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency)
    ) as session:

        def via(client: KVRouteClient) -> Callable[[int], Awaitable[None]]:
            async def call(i: int) -> None:
                await client.agenerate(prompts[i % 64], 1, session=session)

            return call

        ways: dict[str, Callable[[int], Awaitable[None]]] = {"direct": direct}
        for name, cluster in clusters.items():
            ways[name] = via(KVRouteClient(cluster.urls))
        for call in ways.values():
            await drive(args.concurrency * 4, args.concurrency, call)  # warm up
        names = list(ways)
        for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                meters[name].start()
                rate, latencies = await drive(args.requests, args.concurrency, ways[name])
                results[name].append(Round(rate, latencies, meters[name].stop()))
    conditions = {
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "replicas_per_cluster": args.replicas,
        "urls": {name: c.urls for name, c in clusters.items()},
    }
    return results, conditions


def _name(routers: int, plane: str, planes: int) -> str:
    """`2 routers`, or `2 routers (zmq)` when data planes are compared."""
    name = f"{routers} router" + ("s" if routers > 1 else "")
    return f"{name} ({plane})" if planes > 1 else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200 requests")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--tiers", default="1,2,4", help="router counts, comma-separated")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--data-planes", default="zmq", help="router.data_plane values, comma-separated: zmq,ray"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router-tier"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests = 2, 200
    load_before = os.getloadavg()
    started = time.perf_counter()
    results, conditions = asyncio.run(measure(args))
    conditions["load_average_at_start"] = load_before
    conditions["wall_s"] = round(time.perf_counter() - started, 1)
    rows = summarize(results, "direct")
    note = (
        f"{args.requests} requests x {args.rounds} rounds per path, {args.concurrency} in "
        f"flight, {args.replicas} replicas per cluster, {args.prompt_tokens}-token prompts "
        f"(64 distinct, cycled), 1 output token, zero-cost simulated executor; medians over "
        f"rounds; {conditions['cores']} cores, load average "
        f"{load_before[0]:.2f} at start, {conditions['load_average_at_end'][0]:.2f} at end."
    )
    table = render_table(rows, "direct")
    print(f"\n{note}\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.tier", *sys.argv[1:]])
    (args.out / "live.md").write_text(f"# Router tier, live\n\n`{command}`\n\n{note}\n\n{table}\n")
    payload = {
        "command": command,
        "args": {k: str(v) for k, v in vars(args).items()},
        "conditions": conditions,
        "rows": [asdict(row) for row in rows],
        "rounds": {
            name: [{"rate": r.rate, "cpu_s": r.cpu_s} for r in runs]
            for name, runs in results.items()
        },
    }
    (args.out / "live.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
