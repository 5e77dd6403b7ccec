"""External engines for tests and benchmarks: `kvroute serve-replica` as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0

# A hybrid model (full attention + a window) over byte tokens, run by the simulated
# executor: the engines' KV caches, hashes and events are real; the model is not.
# COST is the executor's cost model (engine_model fills it in).
_ENGINE_MODEL = """\
model:
  name: tiny-external
  block_size: 16
  num_blocks: 1024
  vocab_size: 256
  max_model_len: 4096
  groups:
    - {kind: full_attention, num_kv_heads: 2, head_size: 8, dtype: float32}
    - {kind: sliding_window, sliding_window: 64, num_kv_heads: 2, head_size: 8, dtype: float32}
hashing:
  algo: sha256
replicas:
  count: 1
  executor: simulated
  cost: COST
"""


def engine_model(prefill_tokens_per_s: float = 200_000.0, step_base_s: float = 0.002) -> str:
    """The engines' config YAML, with the simulated executor's costs."""
    cost = (
        f"{{prefill_tokens_per_s: {prefill_tokens_per_s!r}, step_base_s: {step_base_s!r}, "
        "decode_s_per_seq: 0.0, kv_read_s_per_block: 0.0}"
    )
    return _ENGINE_MODEL.replace("COST", cost)


ENGINE_MODEL = engine_model()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned_to(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A `preexec_fn` that confines the new process, and every process it starts, to
    `cpus`; None (no confinement) for None. Engines that share cores slow each other
    down, which a real cluster, one accelerator per engine, never sees."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@dataclass
class Engine:
    """One serve-replica process on its own HTTP, event and replay ports; `cpus`, if
    set, the only cores it runs on."""

    name: str
    config: Path
    hash_seed: str | None
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    cpus: frozenset[int] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def external_entry(self) -> dict[str, Any]:
        """This engine as the router config's `external:` entry."""
        return {
            "name": self.name,
            "url": self.url,
            "events": {
                "endpoint": f"tcp://127.0.0.1:{self.events_port}",
                "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
                "topic": "kv",
            },
        }

    def start(self) -> Engine:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{self.events_port}",
            "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
            "topic": "kv",
        }
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PYTHONHASHSEED", None)
        if self.hash_seed is not None:
            env["PYTHONHASHSEED"] = self.hash_seed
        command = [
            sys.executable,
            "-m",
            "kvroute.router.app.cli",
            "serve-replica",
            str(self.config),
        ]
        command += ["--port", str(self.port), "--kv-events-config", json.dumps(events)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=log, preexec_fn=pinned_to(self.cpus)
            )
        return self

    @property
    def log(self) -> Path:
        return self.config.with_name(f"{self.name}.log")

    def wait_healthy(self, deadline_s: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} was not healthy within {deadline_s:g} s")

    def kill(self) -> None:
        """SIGKILL: the engine vanishes without closing anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=DEADLINE_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=DEADLINE_S)
