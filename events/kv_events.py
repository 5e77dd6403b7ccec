"""The wire contract between replicas and the router: vLLM's KV cache event structs.

Field order, tags and encoding are vLLM's at the seed's commit (array-encoded
msgspec structs, tagged by class name), so a real vLLM engine and our replicas
produce the same bytes. Every other module imports these names and never builds
frames by hand.
"""

from __future__ import annotations

from typing import Any

import msgspec

MEDIUM_GPU = "GPU"

# A block hash as it travels in events: the low 64 bits of the engine's hash as
# an unsigned int (the default), or the raw hash bytes when int hashes are off.
ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A timestamped batch of events from one engine step."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of all KV cache events; the tag is the subclass name."""


class BlockStored(KVCacheEvent):
    """Consecutive full blocks of one request became cached in one KV cache group.

    `parent_block_hash` is the hash of the block before the first one here (None
    for the first block of a prompt); `token_ids` holds `block_size` tokens per
    block; `kv_cache_spec_kind` and `kv_cache_spec_sliding_window` describe the
    group so a consumer can apply that group's hit rules.
    """

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks of one group left the prefix cache (evicted or reset)."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    """The engine dropped its whole prefix cache."""


KVCacheEventType = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    """The unit published per engine step."""

    events: list[KVCacheEventType]
