"""Loader for the KV cache event captures recorded from a real vLLM (tests/data/vllm).

A capture holds the exact ZeroMQ frames vLLM's `ZmqEventPublisher` sent, the prompts
that caused them and vLLM's own prefix-cache hit for each prompt; see
tests/data/vllm/README.md for how they were produced.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.specs import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    SlidingWindowSpec,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "vllm"
CAPTURE_PATHS = sorted(DATA_DIR.glob("capture-*.json.gz"))


@dataclass(frozen=True)
class GroupLayout:
    """One KV cache group of the recorded engine."""

    kind: str
    block_size: int
    sliding_window: int | None

    def spec(self) -> KVCacheSpec:
        """The group as a kvroute spec (head geometry does not change any hit)."""
        geometry: dict[str, Any] = {
            "block_size": self.block_size,
            "num_kv_heads": 1,
            "head_size": 8,
            "dtype": torch.float16,
        }
        if self.kind == "full_attention":
            return FullAttentionSpec(**geometry)
        if self.kind == "sliding_window" and self.sliding_window is not None:
            return SlidingWindowSpec(**geometry, sliding_window=self.sliding_window)
        raise ValueError(f"no kvroute spec for recorded group {self}")


@dataclass(frozen=True)
class CapturedPrompt:
    """A prompt as vLLM saw it, its hit there, and the last frame published before.

    `after_seq` is the seq of the last frame vLLM had published when it measured
    `hit` (-1: none yet): replaying frames up to it reproduces the cache it looked at.
    """

    keys: PromptKeys
    lora_id: int | None
    hit: int
    after_seq: int
    tenant: str
    conversation: int
    turn: int


@dataclass(frozen=True)
class Capture:
    """One recording: the engine's settings, the live frames in order, the prompts."""

    name: str
    vllm_version: str
    event_encoding: str
    hash_algo: str
    python_hash_seed: str
    hash_block_size: int
    num_blocks: int
    groups: tuple[GroupLayout, ...]
    frames: tuple[tuple[bytes, ...], ...]
    prompts: tuple[CapturedPrompt, ...]

    def kv_cache_config(self) -> KVCacheConfig:
        """The recorded layout as the config a replica registers with."""
        return KVCacheConfig(
            num_blocks=self.num_blocks,
            kv_cache_groups=[
                KVCacheGroupSpec([f"layer{i}"], group.spec()) for i, group in enumerate(self.groups)
            ],
        )


def _prompt(raw: dict[str, Any]) -> CapturedPrompt:
    keys = PromptKeys(
        tuple(raw["token_ids"]), lora_name=raw["lora_name"], cache_salt=raw["cache_salt"]
    )
    return CapturedPrompt(
        keys,
        raw["lora_id"],
        raw["hit"],
        raw["after_seq"],
        raw["tenant"],
        raw["conversation"],
        raw["turn"],
    )


def load_capture(path: Path) -> Capture:
    """Read one gzipped JSON capture (frames are base64)."""
    with gzip.open(path, "rb") as f:
        raw = json.load(f)
    if raw["format"] != 1:
        raise ValueError(f"{path.name}: unknown capture format {raw['format']!r}")
    layout = raw["layout"]
    return Capture(
        name=path.name.removesuffix(".json.gz"),
        vllm_version=raw["vllm_version"],
        event_encoding=raw["event_encoding"],
        hash_algo=raw["hash_algo"],
        python_hash_seed=raw["python_hash_seed"],
        hash_block_size=layout["hash_block_size"],
        num_blocks=layout["num_blocks"],
        groups=tuple(GroupLayout(**group) for group in layout["groups"]),
        frames=tuple(tuple(base64.b64decode(part) for part in f) for f in raw["frames"]),
        prompts=tuple(_prompt(p) for p in raw["prompts"]),
    )
