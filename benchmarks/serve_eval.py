"""Ingress overhead: an aiohttp server in a Ray actor (kvroute today) against Ray Serve.

Every way in answers POST / with a JSON body by a small JSON body, and does no other
work, so what is measured is the front door itself. One embedded local Ray, the same
client (aiohttp, `--concurrency` in flight), and every round runs each way in, in a
rotated order:
- aiohttp actor: an aiohttp server on the event loop of an async Ray actor, as
  `router/http.py` serves inside `RouterService`;
- aiohttp actor + hop: the same, but the handler awaits a call to a second actor
  before answering: the cost of one Ray actor call, which a Serve deployment adds
  (proxy -> replica) and kvroute's design does not (the HTTP server is the router);
- Serve: a Ray Serve deployment (1 replica) behind Serve's HTTP proxy (uvicorn +
  starlette in the proxy actor, then a call to the replica);
- Serve + router core (`--router-core`): the same deployment, but it runs kvroute's
  `Router.prepare` and `choose` over an index of simulated replicas, and the aiohttp
  actor does the same, so the routing work is equal and only the door differs.

`--serve-profile tuned` turns off what Serve does per request beyond serving it:
access logs (proxy and replica, log level WARNING) and the replica's extra event
loops for user code and its router (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0,
RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0). Proxy settings are global to a Ray
instance, so each profile is its own run, each with its own aiohttp baseline.

CPU seconds per request are read from /proc for the server side (the aiohttp actor;
Serve's proxy, replica and controller) and for this driver (the client).

Run: python -m benchmarks.serve_eval [--quick] [--router-core] [--serve-profile tuned]
Needs `pip install "ray[serve]"` of the installed Ray's version (not a kvroute dependency).
Writes benchmarks/results/serve-eval/serve-<profile>.md and .json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import ray
from aiohttp import web
from tqdm import tqdm

from kvroute.benchmarks.cluster import drive
from kvroute.benchmarks.tier import CpuMeter, Round, actor_pid, render_table, summarize
from kvroute.replicas.api import ModelLimits, ReplicaLoad
from kvroute.replicas.config import HashingConfig, ModelConfig
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.specs import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from kvroute.router.config import RouterConfig
from kvroute.router.core import Registration, Router, router_settings
from kvroute.router.policy import make_policy

REPLY = {"id": "cmpl-0", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}
BLOCK = 16
ROUTED_REPLICAS = 8
TUNED_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def routing_core() -> Router:
    """A kvroute router core over ROUTED_REPLICAS idle simulated replicas (no dispatch)."""
    import torch

    config = KVCacheConfig(
        num_blocks=4096,
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["full"],
                FullAttentionSpec(
                    block_size=BLOCK, num_kv_heads=8, head_size=128, dtype=torch.bfloat16
                ),
            )
        ],
    )
    settings = router_settings(
        RouterConfig(reuse_memory=0.0),
        HashingConfig(algo="sha256", seed="serve-eval"),
        ModelConfig(),
        ROUTED_REPLICAS,
        hash_block_size=BLOCK,
    )
    core = Router(settings, make_policy("kv_aware"))
    for i in range(ROUTED_REPLICAS):
        core.register(
            Registration(
                replica_id=f"r{i}",
                kv_cache_config=config,
                hash_block_size=BLOCK,
                scheduler_block_size=BLOCK,
                use_eagle=False,
                hash_algo="sha256",
                hash_seed="serve-eval",
                limits=ModelLimits(max_model_len=8192, vocab_size=32_000),
            )
        )
        core.report_load(f"r{i}", ReplicaLoad())
    return core


def route(core: Router, body: dict[str, Any]) -> dict[str, Any]:
    """Prepare and choose as `RouterService` does, then finish at once (no replica)."""
    prepared = core.prepare(PromptKeys(tuple(body["prompt"])), body.get("max_tokens", 1))
    decision = core.choose(prepared)
    core.finish(decision, prepared.num_tokens, 0)
    return {**REPLY, "replica": decision.replica_id}


class Echo:
    """The actor a hop goes to: answers at once."""

    async def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        return REPLY


class AiohttpServer:
    """An aiohttp server on this async actor's event loop, like kvroute's router."""

    def __init__(self, hop: Any | None, with_core: bool) -> None:
        self.hop = hop
        self.core = routing_core() if with_core else None
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.core is not None:
            return web.json_response(route(self.core, body))
        if self.hop is not None:
            return web.json_response(await self.hop.reply.remote(body))
        return web.json_response(REPLY)

    async def start(self, port: int) -> str:
        app = web.Application()
        app.router.add_post("/", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/"


def start_aiohttp(hop: Any | None = None, with_core: bool = False) -> tuple[Any, str]:
    actor = ray.remote(AiohttpServer).options(max_concurrency=10_000, num_cpus=0)
    handle = actor.remote(hop, with_core)
    return handle, ray.get(handle.start.remote(free_port()))


def start_serve(with_core: bool, port: int, tuned: bool) -> dict[str, tuple[str, str]]:
    """Serve's proxy on `port` and one app per route: "/trivial" and, if asked,
    "/routed". Returns (app name, URL) by path name."""
    from ray import serve
    from starlette.requests import Request

    quiet = {"enable_access_log": False, "log_level": "WARNING"} if tuned else None
    options: dict[str, Any] = {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 1000,
    }
    if quiet is not None:
        options["logging_config"] = quiet

    @serve.deployment(**options)
    class Trivial:
        async def __call__(self, request: Request) -> dict[str, Any]:
            await request.json()
            return REPLY

    @serve.deployment(**options)
    class Routed:
        def __init__(self) -> None:
            self.core = routing_core()

        async def __call__(self, request: Request) -> dict[str, Any]:
            return route(self.core, await request.json())

    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    serve.run(Trivial.bind(), name="trivial", route_prefix="/trivial")
    apps = {"Serve": ("trivial", f"http://127.0.0.1:{port}/trivial")}
    if with_core:
        serve.run(Routed.bind(), name="routed", route_prefix="/routed")
        apps["Serve + router core"] = ("routed", f"http://127.0.0.1:{port}/routed")
    return apps


def serve_pids(app: str) -> dict[str, list[int]]:
    """Serve's proxy and controller, and the replica of `app`, by role, found by the
    actor names Serve gives them (SERVE_PROXY_ACTOR-..., SERVE_REPLICA::<app>#...)."""
    roles: dict[str, list[int]] = {"proxy": [], "replica": [], "controller": []}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith("SERVE_REPLICA::"):
            role = "replica" if name.startswith(f"SERVE_REPLICA::{app}#") else None
        else:
            role = next((r for r in ("proxy", "controller") if f"SERVE_{r.upper()}" in name), None)
        if role is not None:
            handle = ray.get_actor(name, namespace=actor["namespace"])
            roles[role].append(actor_pid(handle))
    if not all(roles.values()):
        raise RuntimeError(f"Serve actors not found by name: {roles}")
    return roles


async def measure(args: argparse.Namespace) -> tuple[dict[str, list[Round]], dict[str, Any]]:
    tuned = args.serve_profile == "tuned"
    if tuned:
        os.environ.update(TUNED_ENV)  # before Ray starts: its workers inherit it
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        echo = ray.remote(Echo).options(max_concurrency=10_000, num_cpus=0).remote()
        plain, plain_url = start_aiohttp()
        hopping, hop_url = start_aiohttp(hop=echo)
        urls = {"aiohttp actor": plain_url, "aiohttp actor + hop": hop_url}
        server_pids = {
            "aiohttp actor": [actor_pid(plain)],
            "aiohttp actor + hop": [actor_pid(hopping), actor_pid(echo)],
        }
        if args.router_core:
            routed, routed_url = start_aiohttp(with_core=True)
            urls["aiohttp + router core"] = routed_url
            server_pids["aiohttp + router core"] = [actor_pid(routed)]
        serve_apps = start_serve(args.router_core, free_port(), tuned)
        driver = os.getpid()
        meters = {
            name: CpuMeter({"server": server_pids[name], "client": [driver]})
            for name in server_pids
        }
        for name, (app, url) in serve_apps.items():
            urls[name] = url
            meters[name] = CpuMeter({**serve_pids(app), "client": [driver]})
        return await _rounds(args, urls, meters), {"serve_apps": list(serve_apps)}
    finally:
        ray.shutdown()


async def _rounds(
    args: argparse.Namespace, urls: dict[str, str], meters: dict[str, CpuMeter]
) -> dict[str, list[Round]]:
    rng = random.Random(0)
    bodies = [
        {"prompt": [rng.randrange(32_000) for _ in range(args.prompt_tokens)], "max_tokens": 1}
        for _ in range(64)
    ]
    results: dict[str, list[Round]] = {name: [] for name in urls}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency)
    ) as session:

        def poster(url: str) -> Callable[[int], Awaitable[None]]:
            async def call(i: int) -> None:
                async with session.post(url, json=bodies[i % 64]) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}")

            return call

        ways = {name: poster(url) for name, url in urls.items()}
        for call in ways.values():
            await drive(args.concurrency * 8, args.concurrency, call)  # warm up
        names = list(ways)
        for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                meters[name].start()
                rate, latencies = await drive(args.requests, args.concurrency, ways[name])
                results[name].append(Round(rate, latencies, meters[name].stop()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 300 requests")
    parser.add_argument("--router-core", action="store_true", help="also route in both doors")
    parser.add_argument("--serve-profile", choices=("default", "tuned"), default="default")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve-eval"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests = 2, 300
    import ray.serve  # fail before Ray starts when Serve is not installed

    load_before = os.getloadavg()
    started = time.perf_counter()
    results, conditions = asyncio.run(measure(args))
    rows = summarize(results, "aiohttp actor")
    note = (
        f"Ray {ray.__version__}, Serve profile {args.serve_profile}; {args.requests} requests "
        f"x {args.rounds} rounds per path, "
        f"{args.concurrency} in flight, one aiohttp client session, a {args.prompt_tokens}-token "
        f"JSON prompt in, a small JSON body out; medians over rounds; {os.cpu_count()} cores, "
        f"load average {load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"{time.perf_counter() - started:.0f} s."
    )
    table = render_table(rows, "aiohttp actor")
    print(f"\n{note}\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    flags = (" --quick" if args.quick else "") + (" --router-core" if args.router_core else "")
    flags += f" --serve-profile {args.serve_profile}"
    command = f"python -m benchmarks.serve_eval{flags}"
    (args.out / f"serve-{args.serve_profile}.md").write_text(
        f"# Ingress: aiohttp actor vs Ray Serve\n\n`{command}`\n\n{note}\n\n{table}\n"
    )
    payload = {
        "command": command,
        "ray": ray.__version__,
        "serve_profile": args.serve_profile,
        "conditions": conditions,
        "rows": [asdict(row) for row in rows],
    }
    (args.out / f"serve-{args.serve_profile}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
