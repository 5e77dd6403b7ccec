"""Proxy overhead in front of an external engine: the same load sent straight to one
`kvroute serve-replica` process and through the router, in alternating rounds.

The engine's simulated executor is made nearly free, so the difference is the
router's work: parse and tokenize-free validation, hashing, prediction, choice,
then the HTTP hop to the engine with the SSE relay (the router always streams
from an engine) and the response it builds. Both paths send the same token-id
prompts with `max_tokens` tokens, non-streamed, from aiohttp clients.

Run: python -m benchmarks.external [--requests 1000 --concurrency 16 --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import ray
import yaml
from tqdm import tqdm

from kvroute.benchmarks.cluster import drive, percentile
from kvroute.benchmarks.engines import Engine, engine_model
from kvroute.router.app.launch import cluster_keys, init_ray, start_router
from kvroute.router.config import parse_config

RESULTS = Path(__file__).resolve().parent / "results" / "external"


def _prompts(n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    tenants = [[rng.randrange(32, 127) for _ in range(tokens - 16)] for _ in range(8)]
    return [
        tenants[i % len(tenants)] + [rng.randrange(32, 127) for _ in range(16)] for i in range(n)
    ]


async def _post_all(
    url: str, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> tuple[float, list[float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def call(i: int) -> None:
            body = {"model": "tiny-external", "prompt": prompts[i], "max_tokens": max_tokens}
            async with session.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                await response.read()

        return await drive(len(prompts), concurrency, call)


def measure(args: argparse.Namespace) -> dict[str, list[tuple[float, list[float]]]]:
    workdir = Path(tempfile.mkdtemp(prefix="kvroute-external-bench-"))
    config_path = workdir / "engine.yaml"
    config_path.write_text(engine_model(prefill_tokens_per_s=1e12, step_base_s=0.0))
    engine = Engine("engine-1", config_path, hash_seed=None).start()
    try:
        engine.wait_healthy()
        data: dict[str, Any] = yaml.safe_load(config_path.read_text())
        data["replicas"]["count"] = 0
        data["router"] = {"http_port": 0}
        data["external"] = [engine.external_entry()]
        config = parse_config(data, "external-bench")
        init_ray(config)
        router, url = start_router(config, curve=cluster_keys(config))
        assert url is not None
        prompts = _prompts(args.requests, args.prompt_tokens)
        paths = {"direct": engine.url, "router": url}
        runs: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in paths}
        # Warm both paths (connections, the engine's cache) before measuring.
        for target in paths.values():
            asyncio.run(_post_all(target, prompts[:64], args.max_tokens, args.concurrency))
        with tqdm(total=args.rounds * len(paths), desc="rounds", unit="run") as bar:
            for _ in range(args.rounds):
                for name, target in paths.items():
                    runs[name].append(
                        asyncio.run(_post_all(target, prompts, args.max_tokens, args.concurrency))
                    )
                    bar.update()
        ray.kill(router, no_restart=True)
        ray.shutdown()
        return runs
    finally:
        engine.stop()


def table(runs: dict[str, list[tuple[float, list[float]]]]) -> str:
    """Median over rounds of requests/s and latency percentiles, with ratios to direct."""

    def summary(name: str) -> tuple[float, float, float]:
        rounds = runs[name]
        rate = statistics.median(r for r, _ in rounds)
        p50 = statistics.median(percentile(lat, 0.5) for _, lat in rounds)
        p99 = statistics.median(percentile(lat, 0.99) for _, lat in rounds)
        return rate, p50, p99

    direct = summary("direct")
    lines = [
        "| path | req/s | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in runs:
        rate, p50, p99 = summary(name)
        lines.append(
            f"| {name} | {rate:.0f} | {rate / direct[0]:.0%} | {p50 * 1e3:.2f} | "
            f"{p99 * 1e3:.2f} | {(p50 - direct[1]) * 1e3:+.2f} | {(p99 - direct[2]) * 1e3:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    runs = measure(args)
    report = (
        f"{args.requests} requests x {args.rounds} rounds, {args.concurrency} in flight, "
        f"{args.prompt_tokens}-token prompts, {args.max_tokens} output tokens; one "
        "serve-replica (simulated executor, no step cost) straight or through one router\n\n"
        + table(runs)
    )
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.md").write_text(
        "# Router overhead in front of an external engine\n\n"
        "`python -m benchmarks.external` (2 CPU cores, shared)\n\n" + report + "\n"
    )


if __name__ == "__main__":
    main()
