"""Record a KV cache event capture from vLLM's own block manager (not run in CI).

Run with a vLLM virtualenv's python and a fixed seed, e.g.

    PYTHONHASHSEED=1337 /work/vllm-venv/bin/python tests/data/vllm/record.py \
        tests/data/vllm/capture-vllm-0.23.0.json.gz

It drives `vllm.v1.core.kv_cache_manager.KVCacheManager` (prefix caching and KV
cache events on) over a hybrid layout, one full-attention group and one
sliding-window group, with a small pool so blocks get evicted. Each prompt's hit
is vLLM's `get_computed_blocks`, measured before the prompt is allocated; then the
prompt is prefilled and decoded step by step as the scheduler does (allocate,
count the computed tokens, append the output token, free when done) and each
step's events go through vLLM's `ZmqEventPublisher`, bound on IPv6 loopback. A SUB
socket records the multipart frames exactly as they arrive; the publisher's replay
endpoint is read back at the end as a check that none was lost. README.md beside
this file describes the output.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
import vllm
import zmq
from vllm.distributed.kv_events import KVCacheEvent, KVEventBatch, ZmqEventPublisher
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request

HASH_ALGO = "sha256"  # vLLM's default `prefix_caching_hash_algo`
BLOCK_SIZE = 16
SLIDING_WINDOW = 64
NUM_BLOCKS = 96  # shared by both groups: small enough to evict
MAX_MODEL_LEN = 2048
WORKLOAD_SEED = 13
TOPIC = "kvroute-capture"
DEADLINE_S = 30.0


@dataclass
class Tenant:
    """A client of the engine: a system prompt and the extra keys of its requests."""

    name: str
    system: list[int]
    cache_salt: str | None = None
    lora: tuple[str, int] | None = None


@dataclass
class Conversation:
    """A multi-turn chat: each turn's prompt is the previous prompt, its output and a
    new user message."""

    number: int
    tenant: Tenant
    turns: int
    history: list[int] = field(default_factory=list)
    turn: int = 0


def _tokens(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(1, 32_000) for _ in range(rng.randint(low, high))]


def workload(rng: random.Random) -> list[tuple[Tenant, list[int], int, int]]:
    """(tenant, prompt, conversation id, turn) per request, conversations interleaved.

    Tenants share system prompts on purpose: the same tokens under another salt or
    LoRA adapter must never hit each other's blocks.
    """
    acme = _tokens(rng, 70, 90)
    tenants = [
        Tenant("acme", acme),
        Tenant("acme-lora", acme, lora=("chat-lora", 2)),
        Tenant("initech", acme, cache_salt="initech-salt"),
        Tenant("globex", _tokens(rng, 30, 50), cache_salt="globex-salt"),
        Tenant("umbrella", _tokens(rng, 40, 60), lora=("sql-lora", 1)),
        Tenant("anon", []),
    ]
    pending = [Conversation(n, rng.choice(tenants), rng.randint(1, 4)) for n in range(48)]
    requests: list[tuple[Tenant, list[int], int, int]] = []
    while pending:
        conv = rng.choice(pending)
        if conv.turn == 0:
            conv.history = list(conv.tenant.system)
        conv.history += _tokens(rng, 4, 40)
        conv.turn += 1
        requests.append((conv.tenant, list(conv.history), conv.number, conv.turn))
        if conv.turn == conv.turns:
            pending.remove(conv)
    return requests


def layout() -> KVCacheConfig:
    """One full-attention group and one sliding-window group of the same block size."""
    common: dict[str, Any] = {
        "block_size": BLOCK_SIZE,
        "num_kv_heads": 1,
        "head_size": 8,
        "dtype": torch.float16,
    }
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["full.0"], FullAttentionSpec(**common)),
            KVCacheGroupSpec(["swa.0"], SlidingWindowSpec(**common, sliding_window=SLIDING_WINDOW)),
        ],
    )


class Recorder:
    """vLLM's publisher, bound on IPv6 loopback, and a SUB socket recording what it gets."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        # vLLM binds an endpoint only when it holds "*" or "::"; "[::1]" is loopback and
        # holds "::". Sockets of this context (vLLM's too) get IPv6 on by default.
        self.ctx.setsockopt(zmq.IPV6, 1)
        endpoint, replay_endpoint = _free_endpoint(), _free_endpoint()
        self.publisher = ZmqEventPublisher(
            data_parallel_rank=0,
            endpoint=endpoint,
            replay_endpoint=replay_endpoint,
            topic=TOPIC,
        )
        self.replay_endpoint = replay_endpoint
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sub.connect(endpoint)
        if not self.monitor.poll(int(DEADLINE_S * 1000)):
            raise TimeoutError("never connected to vLLM's publisher")
        time.sleep(0.5)  # the subscription reaches vLLM's PUB; `collect` checks nothing is lost
        self.published = 0
        self.frames: list[list[bytes]] = []

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Publish one step's events as the scheduler does (nothing when empty)."""
        if events:
            self.publisher.publish(KVEventBatch(ts=time.time(), events=events))
            self.published += 1

    def collect(self) -> list[list[bytes]]:
        """Every frame the SUB got, checked against the publisher's replay buffer."""
        deadline = time.monotonic() + DEADLINE_S
        while len(self.frames) < self.published:
            if not self.sub.poll(100) and time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.frames)} of {self.published} batches arrived")
            while self.sub.poll(0):
                self.frames.append(self.sub.recv_multipart())
        seqs = [int.from_bytes(f[1], "big") for f in self.frames]
        if seqs != list(range(self.published)):
            raise RuntimeError(f"live stream lost or reordered batches: {seqs[:5]}...")
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed: list[bytes] = []
        while True:
            if not dealer.poll(int(DEADLINE_S * 1000)):
                raise TimeoutError("no replay reply")
            reply = dealer.recv_multipart()
            if reply[-2] == ZmqEventPublisher.END_SEQ:
                break
            replayed.append(reply[-1])
        dealer.close(linger=0)
        if replayed != [f[2] for f in self.frames]:
            raise RuntimeError("replayed payloads differ from the live ones")
        return self.frames

    def close(self) -> None:
        self.publisher.shutdown()
        self.monitor.close(linger=0)
        self.sub.close(linger=0)


def _free_endpoint() -> str:
    """A TCP endpoint on IPv6 loopback with a port that is free now."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        return f"tcp://[::1]:{probe.getsockname()[1]}"


def serve(manager: KVCacheManager, recorder: Recorder, request: Request, output: list[int]) -> int:
    """Run one request to completion, one scheduler step at a time; returns its hit."""
    computed, hit = manager.get_computed_blocks(request)
    num_new = request.num_tokens - hit
    for step, token in enumerate(output):
        manager.new_step_starts()
        if step == 0:
            blocks = manager.allocate_slots(request, num_new, hit, computed)
        else:
            blocks = manager.allocate_slots(request, num_new)
        if blocks is None:
            raise RuntimeError(f"pool too small for request {request.request_id}")
        request.num_computed_tokens += num_new + (hit if step == 0 else 0)
        request.append_output_token_ids(token)
        num_new = 1
        if step == len(output) - 1:
            manager.free(request)
        recorder.publish(manager.take_events())
    return hit


def record(path: str) -> None:
    seed = os.environ.get("PYTHONHASHSEED")
    if not seed:
        sys.exit("set PYTHONHASHSEED: it seeds vLLM's block hashes and is recorded")
    hash_fn = get_hash_fn_by_name(HASH_ALGO)
    init_none_hash(hash_fn)
    config = layout()
    manager = KVCacheManager(
        config,
        max_model_len=MAX_MODEL_LEN,
        scheduler_block_size=BLOCK_SIZE,
        hash_block_size=BLOCK_SIZE,
        enable_caching=True,
        enable_kv_cache_events=True,
    )
    hasher = get_request_block_hasher(BLOCK_SIZE, hash_fn)
    rng = random.Random(WORKLOAD_SEED)
    requests = workload(rng)
    reset_at = len(requests) * 2 // 3  # one prefix-cache reset: AllBlocksCleared
    recorder = Recorder()
    prompts: list[dict[str, Any]] = []
    try:
        for i, (tenant, tokens, conversation, turn) in enumerate(requests):
            if i == reset_at:
                if not manager.reset_prefix_cache():
                    raise RuntimeError("prefix cache reset refused")
                recorder.publish(manager.take_events())
            lora = None
            if tenant.lora:  # the adapter is never loaded: only its name enters hashes
                lora = LoRARequest(*tenant.lora, lora_path=f"/adapters/{tenant.lora[0]}")
            request = Request(
                f"req-{i}",
                tokens,
                SamplingParams(max_tokens=32),
                None,
                lora_request=lora,
                cache_salt=tenant.cache_salt,
                block_hasher=hasher,
            )
            after_seq = recorder.published - 1
            output = _tokens(rng, 4, 24)
            hit = serve(manager, recorder, request, output)
            prompts.append(
                {
                    "token_ids": tokens,
                    "cache_salt": tenant.cache_salt,
                    "lora_name": tenant.lora[0] if tenant.lora else None,
                    "lora_id": tenant.lora[1] if tenant.lora else None,
                    "hit": hit,
                    "after_seq": after_seq,
                    "tenant": tenant.name,
                    "conversation": conversation,
                    "turn": turn,
                }
            )
        frames = recorder.collect()
    finally:
        recorder.close()
    groups = [g.kv_cache_spec for g in config.kv_cache_groups]
    array_like = KVCacheEvent.__struct_config__.array_like
    capture = {
        "format": 1,
        "vllm_version": vllm.__version__,
        "event_encoding": "array" if array_like else "map",
        "hash_algo": HASH_ALGO,
        "python_hash_seed": seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "msgspec": msgspec.__version__,
        "pyzmq": zmq.__version__,
        "workload_seed": WORKLOAD_SEED,
        "layout": {
            "num_blocks": NUM_BLOCKS,
            "max_model_len": MAX_MODEL_LEN,
            "hash_block_size": BLOCK_SIZE,
            "groups": [
                {
                    "kind": "sliding_window"
                    if isinstance(s, SlidingWindowSpec)
                    else "full_attention",
                    "block_size": s.block_size,
                    "sliding_window": getattr(s, "sliding_window", None),
                }
                for s in groups
            ],
        },
        "frames": [[base64.b64encode(part).decode() for part in f] for f in frames],
        "prompts": prompts,
    }
    with gzip.GzipFile(path, "wb", mtime=0) as out:
        out.write(json.dumps(capture, separators=(",", ":")).encode())
    hits = sum(1 for p in prompts if p["hit"])
    print(f"{len(prompts)} prompts ({hits} with a hit), {len(frames)} frames -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the gzipped JSON capture")
    record(parser.parse_args().out)


if __name__ == "__main__":
    main()
