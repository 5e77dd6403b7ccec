"""Shared builders for block-manager tests."""

from __future__ import annotations

import pytest
import torch

from kvroute.events.hashing import sha256
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.specs import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from kvroute.replicas.kv_cache.utils import get_request_block_hasher, init_none_hash
from kvroute.replicas.request import Request, SamplingParams


@pytest.fixture(autouse=True)
def _seeded_none_hash() -> None:
    init_none_hash(sha256, seed="0")


def full(block_size: int) -> FullAttentionSpec:
    return FullAttentionSpec(
        block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32
    )


def swa(block_size: int, window: int) -> SlidingWindowSpec:
    return SlidingWindowSpec(
        block_size=block_size,
        num_kv_heads=1,
        head_size=1,
        dtype=torch.float32,
        sliding_window=window,
    )


def mamba(block_size: int, mode: str = "none") -> MambaSpec:
    return MambaSpec(
        block_size=block_size, shapes=((1,),), dtypes=(torch.float32,), mamba_cache_mode=mode
    )


def config(num_blocks: int, *specs: KVCacheSpec) -> KVCacheConfig:
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_groups=[KVCacheGroupSpec([f"layer{i}"], s) for i, s in enumerate(specs)],
    )


def manager(num_blocks: int, *specs: KVCacheSpec, **kwargs: object) -> KVCacheManager:
    hash_block_size = min(s.block_size for s in specs)
    kwargs.setdefault("max_model_len", 8192)
    return KVCacheManager(
        config(num_blocks, *specs),
        hash_block_size=hash_block_size,
        **kwargs,  # type: ignore[arg-type]
    )


def request(request_id: str, tokens: list[int], block_size: int, **kwargs: object) -> Request:
    return Request(
        request_id,
        tokens,
        SamplingParams(max_tokens=16),
        block_hasher=get_request_block_hasher(block_size, sha256),
        **kwargs,  # type: ignore[arg-type]
    )
