"""The engines every path shares: `kvroute serve-replica` processes (the default) or
real vLLM servers (`--engines vllm`, launched by `benchmarks.vllm_launch` from
vLLM's own venv).

Each engine draws its block-hash root from its own PYTHONHASHSEED (kvroute knows
none of them: tokens mode) and publishes vLLM's KV events over ZeroMQ. Its KV memory
is small (about 4,096 tokens of full attention per engine), so the workloads fill and
evict it. The vLLM engines run a tiny random Llama whose tokenizer is one token per
byte, as serve-replica's: the prompts' text is exactly what every router sees and
every engine caches. vLLM runs full attention only (`TinyLlama`); the hybrid layout
is serve-replica's.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvroute.benchmarks import vllm_launch
from kvroute.benchmarks.engines import DEADLINE_S, Engine
from kvroute.benchmarks.vllm_launch import ServerOptions, TinyLlama, VllmServer

ENGINE_KINDS = ("serve-replica", "vllm")
BLOCK_SIZE = 16
# KV memory per engine for each layout: about 4,096 tokens of full attention either
# way (the hybrid pool also holds the window layers' blocks).
KV_MEMORY = {"full": "4MiB", "hybrid": "2720KiB"}
ENGINE_TOKENS = 4096
# Three engines importing torch at once on a busy 2-core machine take a while.
START_DEADLINE_S = 240.0
# vLLM: byte tokens; prompts of the full-attention workloads are at most ~2,400.
VLLM_MODEL = TinyLlama(tokenizer="bytes", max_len=2560)
VLLM_OPTIONS = ServerOptions(
    model="tiny-vllm",
    max_len=VLLM_MODEL.max_len,
    max_num_seqs=16,
    max_num_batched_tokens=2048,
    kv_cache_bytes=ENGINE_TOKENS * VLLM_MODEL.kv_bytes_per_token,
    scale_out=True,
)

_GROUPS: dict[str, list[dict[str, Any]]] = {
    "full": [{"kind": "full_attention", "num_kv_heads": 2, "head_size": 32, "dtype": "bfloat16"}],
    "hybrid": [
        {"kind": "full_attention", "num_kv_heads": 2, "head_size": 32, "dtype": "bfloat16"},
        {
            "kind": "sliding_window",
            "sliding_window": 256,
            "num_kv_heads": 2,
            "head_size": 32,
            "dtype": "bfloat16",
        },
    ],
}


def engine_config(layout: str, executor: str) -> dict[str, Any]:
    """A 4-layer Llama-shaped model over byte tokens (layers alternate between the
    groups in the hybrid layout); `executor` torch runs it, simulated only costs it."""
    return {
        "model": {
            "name": f"tiny-{layout}",
            "block_size": BLOCK_SIZE,
            "vocab_size": 256,
            "max_model_len": 8192,
            "num_layers": 4,
            "hidden_size": 128,
            "num_heads": 4,
            "intermediate_size": 384,
            "groups": _GROUPS[layout],
        },
        "hashing": {"algo": "sha256"},
        "replicas": {
            "count": 1,
            "executor": executor,
            "threads": 1,
            "kv_cache_memory": KV_MEMORY[layout],
            "max_num_seqs": 32,
            "max_num_batched_tokens": 2048,
            "seed": 0,
            # Used by the simulated executor only: 2,000 prefill tokens/s, 10 ms steps.
            "cost": {
                "prefill_tokens_per_s": 2000.0,
                "step_base_s": 0.01,
                "decode_s_per_seq": 0.0,
                "kv_read_s_per_block": 0.0,
            },
        },
    }


@dataclass
class Fleet:
    """Running engines and the config they serve (routers that need the model, as
    kvroute does for hashing, read it from here)."""

    engines: list[Engine] | list[VllmServer]
    config: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.config["model"]["name"])

    @property
    def block_size(self) -> int:
        return int(self.config["model"]["block_size"])

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def pids(self) -> list[int]:
        return [e.process.pid for e in self.engines if e.process is not None]

    def reset_prefix_caches(self) -> None:
        """POST /reset_prefix_cache to every engine (a 409, blocks still held by a
        request finishing, is retried until the deadline), then one request of a
        single token to each: vLLM publishes a reset's AllBlocksCleared only with its
        next step's events, and the routers that follow the events must see it before
        a run starts. A prompt shorter than a block caches nothing."""
        for url in self.urls:
            deadline = time.monotonic() + DEADLINE_S
            while True:
                try:
                    request = urllib.request.Request(f"{url}/reset_prefix_cache", method="POST")
                    with urllib.request.urlopen(request, timeout=10):
                        break
                except urllib.error.HTTPError as exc:
                    if exc.code != 409 or time.monotonic() > deadline:
                        raise RuntimeError(f"{url} refused to reset its prefix cache") from exc
                    time.sleep(0.1)
        step = {"model": self.model, "prompt": "x", "max_tokens": 1}
        for url in self.urls:
            vllm_launch.http(f"{url}/v1/completions", step, timeout=DEADLINE_S)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()


def vllm_config(checkpoint: Path) -> dict[str, Any]:
    """kvroute's view of the vLLM engines' model: the checkpoint's own tokenizer,
    vLLM's block size and hash algorithm, no replicas of its own."""
    return {
        "model": {
            "name": VLLM_OPTIONS.model,
            "tokenizer": str(checkpoint / "tokenizer.json"),
            "block_size": vllm_launch.BLOCK,
            "vocab_size": VLLM_MODEL.vocab,
            "max_model_len": VLLM_MODEL.max_len,
            "groups": [VLLM_MODEL.group()],
        },
        "hashing": {"algo": "sha256"},
        "replicas": {"count": 0},
    }


def engine_cpus(count: int, pin: bool) -> list[frozenset[int] | None]:
    """Each engine's cores: with `pin`, engine i runs on core i alone (so at most as
    many engines as this process may use); otherwise anywhere."""
    if not pin:
        return [None] * count
    cores = sorted(os.sched_getaffinity(0))
    if count > len(cores):
        raise ValueError(f"cannot pin {count} engines to {len(cores)} cores, one core each")
    return [frozenset({core}) for core in cores[:count]]


def _start_vllm(count: int, python: str, workdir: Path, pin: bool) -> Fleet:
    checkpoint = workdir / "vllm-checkpoint"
    if not checkpoint.exists():
        VLLM_MODEL.write(checkpoint, seed=0)
    servers = vllm_launch.plan_servers(count, workdir, prefix="vllm")
    for server, cpus in zip(servers, engine_cpus(count, pin), strict=True):
        server.cpus = cpus
    fleet = Fleet(servers, vllm_config(checkpoint))
    try:
        for server in servers:
            server.start(python, checkpoint, VLLM_OPTIONS)
        vllm_launch.wait_healthy(servers)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def start_fleet(
    kind: str,
    layout: str,
    count: int,
    executor: str,
    workdir: Path,
    python: str,
    pin: bool = False,
) -> Fleet:
    """`count` healthy engines of `kind` for `layout`, each on a core of its own
    with `pin`; `python` is vLLM's venv's."""
    if kind == "vllm":
        if layout != "full":
            raise ValueError(f"--engines vllm runs full attention only, not {layout!r}")
        return _start_vllm(count, python, workdir, pin)
    config = engine_config(layout, executor)
    path = workdir / f"engine-{layout}.yaml"
    path.write_text(yaml.safe_dump(config))
    engines = [
        Engine(f"{layout}-{i + 1}", path, hash_seed=str(i + 1), cpus=cpus)
        for i, cpus in enumerate(engine_cpus(count, pin))
    ]
    fleet = Fleet(engines, config)
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_healthy(START_DEADLINE_S)
    except BaseException:
        fleet.stop()
        raise
    return fleet
