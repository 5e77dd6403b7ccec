"""Live-cluster throughput: HTTP -> router -> Ray -> replica, against direct actor calls.

The replicas' simulated executor is made nearly free (no step cost) so the
numbers measure the serving path, not the model. Three ways in, same
replicas, same prompts, same concurrency, alternating rounds:
- direct: the driver calls replica actors round robin (no router);
- relay: a bare actor that forwards each call to a replica round robin and
  does nothing else: the cost of any one extra Ray hop, the bound for a
  router that dispatches through actor handles;
- router (Ray): the driver calls the router actor's `generate`;
- router (HTTP): aiohttp clients POST /v1/completions.

The router reaches the replicas over `--data-plane` (`router.data_plane`: zmq, the
default, or ray).

Run: python -m benchmarks.cluster [--requests 2000 --concurrency 32] [--data-plane ray]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec
import ray
from tqdm import tqdm

from kvroute.replicas.api import GenerateRequest
from kvroute.replicas.config import CostConfig
from kvroute.router.app.launch import start_cluster
from kvroute.router.config import load_config
from kvroute.router.openai.protocol import CompletionInput


class Relay:
    """Forwards `generate` to replicas round robin: one Ray hop, no routing."""

    def __init__(self, replicas: list[object]) -> None:
        self.replicas = replicas
        self.next = 0

    async def generate(self, request: GenerateRequest) -> object:
        replica = self.replicas[self.next % len(self.replicas)]
        self.next += 1
        return await replica.generate.remote(request)  # type: ignore[attr-defined]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(
    n: int, concurrency: int, call: Callable[[int], Awaitable[None]]
) -> tuple[float, list[float]]:
    """Run `call(i)` for i < n with `concurrency` in flight; (requests/s, latencies)."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started), latencies


async def measure(args: argparse.Namespace) -> dict[str, list[tuple[float, list[float]]]]:
    config = load_config(args.config)
    fast = CostConfig(
        prefill_tokens_per_s=1e12, step_base_s=0.0, decode_s_per_seq=0.0, kv_read_s_per_block=0.0
    )
    config = msgspec.structs.replace(
        config,
        replicas=msgspec.structs.replace(
            config.replicas, count=args.replicas, cost=fast, executor="simulated"
        ),
        router=msgspec.structs.replace(config.router, http_port=0, data_plane=args.data_plane),
    )
    cluster = start_cluster(config)
    relay = ray.remote(Relay).options(max_concurrency=10_000, num_cpus=0).remote(cluster.replicas)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(config.model.vocab_size) for _ in range(args.prompt_tokens)]
        for _ in range(64)
    ]
    results: dict[str, list[tuple[float, list[float]]]] = {
        "direct": [],
        "relay": [],
        "router (Ray)": [],
        "router (HTTP)": [],
    }
    counter = 0

    def rid() -> str:
        nonlocal counter
        counter += 1
        return f"bench-{counter}"

    async def direct(i: int) -> None:
        replica = cluster.replicas[i % len(cluster.replicas)]
        await replica.generate.remote(GenerateRequest(rid(), prompts[i % 64], 1))

    async def via_relay(i: int) -> None:
        await relay.generate.remote(GenerateRequest(rid(), prompts[i % 64], 1))

    async def via_ray(i: int) -> None:
        await cluster.router.actor.generate.remote(
            CompletionInput(token_ids=prompts[i % 64], max_tokens=1)
        )

    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency)
        ) as session:

            async def via_http(i: int) -> None:
                body = {"prompt": prompts[i % 64], "max_tokens": 1}
                async with session.post(f"{cluster.url}/v1/completions", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")

            ways = {
                "direct": direct,
                "relay": via_relay,
                "router (Ray)": via_ray,
                "router (HTTP)": via_http,
            }
            for call in ways.values():
                await drive(args.concurrency * 4, args.concurrency, call)  # warm up
            for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
                for name, call in ways.items():
                    results[name].append(await drive(args.requests, args.concurrency, call))
    finally:
        cluster.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-plane", choices=("zmq", "ray"), default="zmq")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    direct_rate = statistics.median(rate for rate, _ in results["direct"])
    direct_p50 = statistics.median(percentile(lat, 0.5) for _, lat in results["direct"])
    print(
        f"\n{args.requests} requests x {args.rounds} rounds, {args.concurrency} in flight, "
        f"{args.replicas} replicas, {args.prompt_tokens}-token prompts, 1 output token, "
        f"zero-cost executor, {args.data_plane} data plane; medians over rounds\n"
    )
    header = (
        f"{'path':<15} {'req/s':>7} {'vs direct':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'added p50 ms':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        p50 = statistics.median(percentile(lat, 0.5) for _, lat in runs)
        p99 = statistics.median(percentile(lat, 0.99) for _, lat in runs)
        print(
            f"{name:<15} {rate:>7.0f} {rate / direct_rate:>8.0%} {p50 * 1e3:>7.2f} "
            f"{p99 * 1e3:>7.2f} {(p50 - direct_p50) * 1e3:>12.2f}"
        )


if __name__ == "__main__":
    main()
