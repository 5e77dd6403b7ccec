"""Soak under contention: mixed, partly hostile traffic against a router it launches,
while the machine's CPU is stolen and replicas freeze and die.

The router runs in its own process (no Ray) in front of `kvroute serve-replica`
engines (simulated executor: real KV caches, hashes, events and HTTP). Traffic:
ordinary and streamed completions, streams abandoned midway, poisoned requests
(a seed outside torch's range), oversized prompts, batches within and over the
prompt cap, and once a 200,000-prompt body while /health is timed. Chaos on a
timeline (fractions of the run): two busy-loop processes from 20% to 50%; engine-0
frozen (SIGSTOP) from 35% to 55%; engine-2 killed at 70%.

Every request carries a `timeout`; "hung" is one with no answer DEADLINE_GRACE_S
past it, "lost" one that ended with no HTTP answer or a 5xx other than 503/504.
"cut" is a stream whose engine was killed after it had sent tokens: it ends with
the router's `died mid-stream` error event (tokens already sent cannot be taken back
and re-run elsewhere), an honest answer, not a 503 from a live cluster.
The table: ok, 4xx, 429, 503, 504, cut, lost, hung, the router's loop-lag p99 (its own
/status), the slowest /health seen, and the huge body's refusal time.

Run: python -m benchmarks.soak [--duration 600] [--out benchmarks/results/soak]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from kvroute.benchmarks.engines import REPO, Engine, engine_model, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "soak"
REQUEST_TIMEOUT_S = 20.0
DEADLINE_GRACE_S = 10.0
WORKERS = 6
HUGE_PROMPTS = 200_000
# (kind, weight): what each worker sends next.
MIX = (
    ("ordinary", 40),
    ("stream", 15),
    ("abandoned", 10),
    ("poisoned", 8),
    ("oversized", 7),
    ("batch", 10),
    ("over_cap", 5),
)


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    health_max_s: float = 0.0
    huge_refusal_s: float = 0.0
    huge_status: int = 0
    huge_health_max_s: float = 0.0

    def status(self, status: int) -> None:
        if status == 200:
            self.outcomes["ok"] += 1
        elif status in (429, 503, 504):
            self.outcomes[str(status)] += 1
        elif 400 <= status < 500:
            self.outcomes["4xx"] += 1
        else:
            self.outcomes["lost"] += 1


def router_config(engines: list[Engine], port: int) -> dict[str, Any]:
    model = yaml.safe_load(engine_model(prefill_tokens_per_s=100_000.0, step_base_s=0.005))
    return {
        **model,
        "replicas": {"count": 0},
        "router": {
            "http_port": port,
            "first_token_timeout_s": 3.0,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "max_requests_per_replica": 64,
        },
        "external": [engine.external_entry() for engine in engines],
    }


def serve_router(config_path: str) -> None:
    """The router process: a RouterService with its HTTP server until SIGTERM."""
    from kvroute.events.curve import CurveKeyPair
    from kvroute.router.app.logs import configure_logging
    from kvroute.router.config import load_config
    from kvroute.router.service.router_service import RouterService

    configure_logging("WARNING")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        config = load_config(config_path)
        service = RouterService(config, curve=CurveKeyPair.generate())
        await service.ready()
        await stop.wait()
        await service.shutdown()

    asyncio.run(main())


def _busy() -> None:
    while True:
        pass


def _body(kind: str, rng: random.Random) -> dict[str, Any]:
    tenant = rng.randrange(8)
    prompt = f"tenant {tenant} system prompt. " * 20 + f"question {rng.random()}"
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": 8, "timeout": REQUEST_TIMEOUT_S}
    if kind in ("stream", "abandoned"):
        body["stream"] = True
    elif kind == "poisoned":
        body.update(seed=2**64, n=2)
    elif kind == "oversized":
        body["prompt"] = "x" * 5000  # past max_model_len (4096 byte tokens)
    elif kind == "batch":
        body["prompt"] = [prompt + str(i) for i in range(16)]
    elif kind == "over_cap":
        body["prompt"] = ["short"] * 1000
    return body


async def _one(session: aiohttp.ClientSession, url: str, kind: str, tally: Tally) -> None:
    body = _body(kind, random.Random())
    tally.kinds[kind] += 1
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S + DEADLINE_GRACE_S)
    try:
        async with session.post(f"{url}/v1/completions", json=body, timeout=timeout) as response:
            if kind == "abandoned" and response.status == 200:
                await response.content.readline()
                tally.outcomes["ok"] += 1
                return  # closing the response abandons the stream
            payload = await response.read()
            status = response.status
            if status == 200 and body.get("stream") and b"[DONE]" not in payload:
                status = 599  # the stream ended without its end
            if status == 200 and body.get("stream") and b"died mid-stream" in payload:
                tally.outcomes["cut"] += 1
                return
            if status == 200 and body.get("stream") and b'"error"' in payload:
                status = 503 if b"no_replica" in payload else 599
            tally.status(status)
    except TimeoutError:
        tally.outcomes["hung"] += 1
    except aiohttp.ClientError:
        tally.outcomes["lost"] += 1


async def _worker(url: str, end: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    kinds = [kind for kind, weight in MIX for _ in range(weight)]
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            await _one(session, url, rng.choice(kinds), tally)


async def _health(url: str, end: float, tally: Tally) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            started = time.perf_counter()
            async with session.get(f"{url}/health/live") as response:
                await response.read()
            tally.health_max_s = max(tally.health_max_s, time.perf_counter() - started)
            await asyncio.sleep(0.25)


async def _huge(url: str, tally: Tally) -> None:
    """A 200,000-prompt body, with /health timed while it is handled."""
    raw = json.dumps({"prompt": ["hi"] * HUGE_PROMPTS, "max_tokens": 1}).encode()
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        big = asyncio.ensure_future(session.post(f"{url}/v1/completions", data=raw))
        while not big.done():
            probe = time.perf_counter()
            async with session.get(f"{url}/health/live") as response:
                await response.read()
            tally.huge_health_max_s = max(tally.huge_health_max_s, time.perf_counter() - probe)
            await asyncio.sleep(0.005)
        response = await big
        tally.huge_refusal_s = time.perf_counter() - started
        tally.huge_status = response.status
        response.release()


async def _chaos(engines: list[Engine], duration: float, log: list[str]) -> None:
    started = time.monotonic()
    busy: list[multiprocessing.Process] = []

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, started + fraction * duration - time.monotonic()))

    def note(what: str) -> None:
        log.append(f"{time.monotonic() - started:7.1f} s  {what}")

    try:
        await at(0.2)
        busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(2)]
        for process in busy:
            process.start()
        note("two busy loops start")
        await at(0.35)
        assert engines[0].process is not None
        engines[0].process.send_signal(signal.SIGSTOP)
        note("engine-0 frozen (SIGSTOP)")
        await at(0.5)
        for process in busy:
            process.kill()
        note("busy loops stop")
        await at(0.55)
        engines[0].process.send_signal(signal.SIGCONT)
        note("engine-0 thawed (SIGCONT)")
        await at(0.7)
        engines[2].kill()
        note("engine-2 killed (SIGKILL)")
    finally:
        for process in busy:
            process.kill()
        if engines[0].process is not None and engines[0].process.poll() is None:
            engines[0].process.send_signal(signal.SIGCONT)


async def _wait_ready(url: str, count: int) -> None:
    deadline = time.monotonic() + 60.0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/status") as response:
                    if response.status == 200 and len((await response.json())["replicas"]) == count:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the router did not route to {count} engines within 60 s")


async def _drive(url: str, engines: list[Engine], duration: float) -> tuple[Tally, dict, list]:
    await _wait_ready(url, len(engines))
    tally = Tally()
    await _huge(url, tally)
    end = time.monotonic() + duration
    chaos_log: list[str] = []
    await asyncio.gather(
        _chaos(engines, duration, chaos_log),
        _health(url, end, tally),
        *(_worker(url, end, tally, seed) for seed in range(WORKERS)),
    )
    async with aiohttp.ClientSession() as session, session.get(f"{url}/status") as response:
        status = await response.json()
    return tally, status, chaos_log


def soak(duration: float, engines_count: int = 3) -> dict[str, Any]:
    """Run the soak for `duration` seconds; returns the numbers the table shows."""
    with tempfile.TemporaryDirectory() as tmp:
        engine_yaml = Path(tmp) / "engine.yaml"
        engine_yaml.write_text(engine_model(prefill_tokens_per_s=100_000.0, step_base_s=0.005))
        engines = [Engine(f"engine-{i}", engine_yaml, "0") for i in range(engines_count)]
        port = free_port()
        config = Path(tmp) / "router.yaml"
        config.write_text(yaml.safe_dump(router_config(engines, port)))
        router = None
        try:
            for engine in engines:
                engine.start()
            for engine in engines:
                engine.wait_healthy()
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            command = [
                sys.executable,
                "-c",
                f"from kvroute.benchmarks.soak import serve_router; serve_router({str(config)!r})",
            ]
            with (Path(tmp) / "router.log").open("ab") as log:
                router = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            url = f"http://127.0.0.1:{port}"
            tally, status, chaos = asyncio.run(_drive(url, engines, duration))
        finally:
            if router is not None:
                router.terminate()
                router.wait(30)
            for engine in engines:
                if engine.process is not None and engine.process.poll() is None:
                    engine.process.send_signal(signal.SIGCONT)
                engine.stop()
    outcomes = tally.outcomes
    return {
        "duration_s": duration,
        "ok": outcomes["ok"],
        "4xx": outcomes["4xx"],
        "429": outcomes["429"],
        "503": outcomes["503"],
        "504": outcomes["504"],
        "cut": outcomes["cut"],
        "lost": outcomes["lost"],
        "hung": outcomes["hung"],
        "loop_lag_p99_s": status["loop_lag"]["p99_s"],
        "loop_lag_max_s": status["loop_lag"]["max_s"],
        "health_max_s": round(tally.health_max_s, 4),
        "huge_status": tally.huge_status,
        "huge_refusal_s": round(tally.huge_refusal_s, 3),
        "huge_health_max_s": round(tally.huge_health_max_s, 4),
        "kinds": dict(tally.kinds),
        "chaos": chaos,
        "replicas_after": [r["replica_id"] for r in status["replicas"]],
    }


def format_table(result: dict[str, Any]) -> str:
    columns = ["ok", "4xx", "429", "503", "504", "cut", "lost", "hung"]
    head = (
        " ".join(f"{c:>7}" for c in columns) + f" {'lag p99':>9} {'lag max':>9} {'health max':>11}"
    )
    row = " ".join(f"{result[c]:>7}" for c in columns)
    row += f" {result['loop_lag_p99_s'] * 1e3:>7.1f}ms {result['loop_lag_max_s'] * 1e3:>7.1f}ms"
    row += f" {result['health_max_s'] * 1e3:>9.1f}ms"
    huge = (
        f"{HUGE_PROMPTS}-prompt body: HTTP {result['huge_status']} in "
        f"{result['huge_refusal_s'] * 1e3:.0f} ms; slowest /health meanwhile "
        f"{result['huge_health_max_s'] * 1e3:.1f} ms"
    )
    return "\n".join(
        [
            f"soak: {result['duration_s']:g} s, requests by kind {result['kinds']}",
            *(f"  {line}" for line in result["chaos"]),
            head,
            row,
            huge,
            f"routed after the run: {result['replicas_after']}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--out", type=Path, help="also write the table and JSON here")
    args = parser.parse_args()
    result = soak(args.duration)
    table = format_table(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.txt").write_text(table + "\n")
        (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
