"""Where a routed request's CPU goes: kvroute against a bare relay, in front of one engine.

The peers harness (`benchmarks.peers`) judges the router against its peers on real
engines, but its CPU per request mixes everything a request costs, moves with the
machine's load by about 0.4 ms, and takes minutes. This measures the same costs
apart, in about a minute, on one `kvroute serve-replica` process (simulated executor,
no step cost, one full-attention group of 16-token blocks):

- base: one request of one output token whose 1,000-character prompt the engine
  already holds (no events to ingest): parse, tokenize, hash, choose, the hop to the
  engine, the response;
- per token: each further streamed token (engine chunk in, client chunk out);
- events: the extra cost of a prompt the engine has never seen (its ~62 blocks are
  stored, then evicted later, each an event the router ingests).

Paths: `direct` (the client alone, straight to the engine: what the client costs),
`relay` (an aiohttp reverse proxy that parses nothing, `benchmarks.peers.relay`) and
`kvroute` (the router in this process, `kv_aware`, the engine in tokens mode).
Relay and router run as their own processes, as deployed; a path's cost is its
process tree's CPU (from /proc) over its requests, read after a short settle so its
last events are in. The engine publishes events whichever path a request took:
kvroute ingests those of the other paths while they run, outside its own windows.
Requests go one at a time; each cell is the median of `--rounds` rounds run in turn.

Run: python -m benchmarks.request_cost [--requests 60 --rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from tqdm import tqdm

from kvroute.benchmarks.engines import REPO, Engine, engine_model, free_port
from kvroute.benchmarks.peers.procs import Launched, cpu_seconds
from kvroute.router.app.in_process import new_event_loop

PROMPT_CHARS = 1000
LONG_TOKENS = 33
PATHS = ("direct", "relay", "kvroute")
SETTLE_S = 0.05  # for a path's last events to reach the router
READY_S = 120.0


def _engine_yaml() -> str:
    """The benchmark engine: one full-attention group, room for 16 prompts."""
    data = yaml.safe_load(engine_model(prefill_tokens_per_s=1e12, step_base_s=0.0))
    data["model"]["groups"] = data["model"]["groups"][:1]
    return yaml.safe_dump(data)


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int) -> None:
    body = {
        "model": "tiny-external",
        "prompt": prompt,
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
    }
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        async for _ in response.content.iter_any():
            pass


def _path_cpu(process: Launched | None, run: Callable[[], None]) -> float:
    """CPU seconds `process`'s tree spent over `run` and a settle after it."""
    before = cpu_seconds([process.pid]) if process is not None else 0.0
    run()
    time.sleep(SETTLE_S)
    return cpu_seconds([process.pid]) - before if process is not None else 0.0


def _wait_ready(process: Launched, url: str) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.command[2]} exited:\n{process.tail()}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    raise TimeoutError(f"{url} was not ready within {READY_S:g} s")


class _Client:
    """Requests one at a time from this thread, on a loop of its own."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.session = self.loop.run_until_complete(self._open())
        self.serial = 0

    @staticmethod
    async def _open() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def prompts(self, new: bool, count: int) -> list[str]:
        """`count` prompts: each never seen before, or one the engine holds."""
        if not new:
            return ["[repeated] " + "r" * PROMPT_CHARS] * count
        self.serial += count
        return [f"[{self.serial - i}] " + "n" * PROMPT_CHARS for i in range(count)]

    def run(self, url: str, prompts: list[str], tokens: int) -> None:
        async def all_of() -> None:
            for prompt in prompts:
                await _stream(self.session, url, prompt, tokens)

        self.loop.run_until_complete(all_of())

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


def _launch(workdir: Path, engine: Engine) -> dict[str, tuple[str, Launched | None]]:
    """Every path's URL and the process whose CPU it costs (none for `direct`)."""
    data: dict[str, Any] = yaml.safe_load((workdir / "engine.yaml").read_text())
    port = free_port()
    data["replicas"]["count"] = 0
    data["cluster"] = {"address": None}
    data["router"] = {"http_host": "127.0.0.1", "http_port": port, "policy": "kv_aware"}
    data["external"] = [engine.external_entry()]
    config = workdir / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kvroute.router.app.cli", "up", str(config)]
    router = Launched(command, workdir / "router.log", env)
    relay_port = free_port()
    command = [sys.executable, "-m", "kvroute.benchmarks.peers.relay", "--port", str(relay_port)]
    relay = Launched([*command, "--engines", engine.url], workdir / "relay.log", env)
    paths = {
        "direct": (engine.url, None),
        "relay": (f"http://127.0.0.1:{relay_port}", relay),
        "kvroute": (f"http://127.0.0.1:{port}", router),
    }
    for url, process in paths.values():
        if process is not None:
            _wait_ready(process, url)
    return paths


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Per path and cell, each round's CPU per request (seconds)."""
    workdir = Path(tempfile.mkdtemp(prefix="kvroute-request-cost-"))
    (workdir / "engine.yaml").write_text(_engine_yaml())
    engine = Engine("engine-1", workdir / "engine.yaml", hash_seed="1").start()
    paths: dict[str, tuple[str, Launched | None]] = {}
    try:
        engine.wait_healthy()
        paths = _launch(workdir, engine)
        client = _Client()
        cells = {
            "repeated-1": (False, 1),
            f"repeated-{LONG_TOKENS}": (False, LONG_TOKENS),
            "new-1": (True, 1),
        }
        for url, _ in paths.values():  # connections, the engine's copy of the repeated prompt
            client.run(url, client.prompts(False, 5) + client.prompts(True, 5), 2)
        results: dict[str, dict[str, list[float]]] = {p: {c: [] for c in cells} for p in PATHS}
        with tqdm(total=args.rounds * len(PATHS) * len(cells), desc="runs", unit="run") as bar:
            for _ in range(args.rounds):
                for path, (url, process) in paths.items():
                    for cell, (new, tokens) in cells.items():
                        prompts = client.prompts(new, args.requests)
                        run = functools.partial(client.run, url, prompts, tokens)
                        used = _path_cpu(process, run)
                        results[path][cell].append(used / args.requests)
                        bar.update()
        client.close()
        return results
    finally:
        for _, process in paths.values():
            if process is not None:
                process.stop()
        engine.stop()


def table(results: dict[str, dict[str, list[float]]]) -> str:
    def cell(path: str, name: str) -> float:
        return statistics.median(results[path][name])

    def split(path: str) -> tuple[float, float, float]:
        base = cell(path, "repeated-1")
        per_token = (cell(path, f"repeated-{LONG_TOKENS}") - base) / (LONG_TOKENS - 1)
        return base, per_token, cell(path, "new-1") - base

    lines = [
        "| path | base ms / request | per streamed token us | events of a new prompt ms |"
        " at 6 tokens, new prompt ms |",
        "|---|---|---|---|---|",
    ]
    for path in PATHS:
        base, per_token, events = split(path)
        total = base + 5 * per_token + events
        lines.append(
            f"| {path} | {base * 1e3:.2f} | {per_token * 1e6:.1f} | {events * 1e3:.2f} | "
            f"{total * 1e3:.2f} |"
        )
    kvroute, relay = split("kvroute"), split("relay")
    extra = [k - r for k, r in zip(kvroute, relay, strict=True)]
    lines.append(
        f"| kvroute - relay | {extra[0] * 1e3:+.2f} | {extra[1] * 1e6:+.1f} | "
        f"{extra[2] * 1e3:+.2f} | {(extra[0] + 5 * extra[1] + extra[2]) * 1e3:+.2f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    args = parser.parse_args()
    results = measure(args)
    text = (
        f"`python -m benchmarks.request_cost --requests {args.requests} --rounds "
        f"{args.rounds}`: each path's process tree CPU, one serve-replica "
        f"engine, {PROMPT_CHARS}-character prompts, one request at a time; medians of "
        f"{args.rounds} rounds\n\n" + table(results)
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Where a routed request's CPU goes\n\n" + text + "\n")


if __name__ == "__main__":
    main()
