"""A `kvroute serve-replica` process run in a thread of the test, on free ports."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import zmq

from kvroute.events.kv_events import BlockStored, KVEventDecoder
from kvroute.events.kv_events_config import parse_kv_events_config
from kvroute.replicas.http_server.serve import ReplicaProcess, ServeOptions, pinned_hash_seed
from kvroute.router.config import load_config

T = TypeVar("T")
DEADLINE_S = 30.0
BLOCK = 4

TINY = """\
model:
  name: tiny
  block_size: 4
  num_blocks: 64
  vocab_size: 256
  max_model_len: 1024
  num_layers: 1
  hidden_size: 32
  num_heads: 4
  intermediate_size: 64
  groups:
    - {kind: full_attention, num_kv_heads: 2, head_size: 8, dtype: float32}
  lora_names: [adapter-a]
replicas:
  count: 1
  executor: simulated
  device: cpu
  cost: {prefill_tokens_per_s: 1000000000.0, step_base_s: STEP, decode_s_per_seq: 0.0,
         kv_read_s_per_block: 0.0}
"""


def tiny_config(
    tmp_path: Path, *, executor: str = "simulated", step_s: float = 0.0, seed: str | None = None
) -> Path:
    """A one-group model of 4-token blocks over byte tokens (the default tokenizer)."""
    text = TINY.replace("STEP", repr(step_s)).replace(
        "executor: simulated", f"executor: {executor}"
    )
    if seed is not None:
        text += f"hashing: {{seed: {seed!r}}}\n"
    path = tmp_path / f"tiny-{executor}-{step_s}-{seed}.yaml"
    path.write_text(text)
    return path


def events_json(port: int) -> str:
    return (
        '{"enable_kv_cache_events": true, "publisher": "zmq", '
        f'"endpoint": "tcp://127.0.0.1:{port}", "topic": "kv"}}'
    )


class ServerThread:
    """A ReplicaProcess on its own event loop in a thread; `call` runs a coroutine
    or function there (the engine belongs to that loop)."""

    def __init__(self, process: ReplicaProcess) -> None:
        self.process = process
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.url = self.call(process.start())

    def call(self, work: Awaitable[T] | Callable[[], T]) -> T:
        if callable(work):
            sync = work

            async def run() -> T:
                return sync()

            work = run()
        future: Future[T] = asyncio.run_coroutine_threadsafe(work, self.loop)  # type: ignore[arg-type]
        return future.result(DEADLINE_S)

    def close(self) -> None:
        self.call(self.process.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEADLINE_S)
        self.loop.close()


@contextmanager
def serve_replica(
    config_path: Path, kv_events: str | None = None, **options: Any
) -> Iterator[ServerThread]:
    settings = load_config(config_path).replica_settings()
    serve_options = ServeOptions(port=0, kv_events=parse_kv_events_config(kv_events), **options)
    server = ServerThread(ReplicaProcess(settings, serve_options, pinned_hash_seed(config_path)))
    try:
        yield server
    finally:
        server.close()


def subscriber(endpoint: str, topic: bytes = b"") -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return ctx, sub


def stored_hashes(sub: zmq.Socket, count: int) -> tuple[list[list[bytes]], list[int]]:
    """Frames and BlockStored hashes received until `count` hashes arrived (deadline)."""
    decoder = KVEventDecoder()
    frames_seen: list[list[bytes]] = []
    hashes: list[int] = []
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    deadline = time.monotonic() + DEADLINE_S
    while len(hashes) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(hashes)} of {count} block hashes arrived"
        if not poller.poll(min(remaining, 1.0) * 1000):
            continue
        frames = sub.recv_multipart()
        frames_seen.append(frames)
        for event in decoder.decode(frames[2]).events:
            if isinstance(event, BlockStored):
                hashes.extend(int(h) for h in event.block_hashes)
    return frames_seen, hashes
