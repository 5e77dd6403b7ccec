"""KV cache layouts: what one layer group stores per block, and how groups form a config.

A spec answers two questions for the rest of the block manager: how many bytes
a block of it occupies (`page_size_bytes`, from torch dtypes) and which hit and
eviction rules apply to it (`kind`). Specs are frozen, so a config can be
shared between a replica and the router's view of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import torch


class KVCacheSpecKind(StrEnum):
    """The kind of a group as it travels in `BlockStored.kv_cache_spec_kind`."""

    FULL_ATTENTION = "full_attention"
    MLA_ATTENTION = "mla_attention"
    SLIDING_WINDOW = "sliding_window"
    SLIDING_WINDOW_MLA = "sliding_window_mla"
    MAMBA = "mamba"
    CHUNKED_LOCAL_ATTENTION = "chunked_local_attention"
    SINK_FULL_ATTENTION = "sink_full_attention"
    ENCODER_ONLY_ATTENTION = "encoder_only_attention"
    CROSS_ATTENTION = "cross_attention"
    UNKNOWN = "unknown"


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class KVCacheSpec:
    """One group's block layout. `block_size` counts tokens per block."""

    block_size: int

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def page_size_bytes(self) -> int:
        raise NotImplementedError

    @property
    def kind(self) -> KVCacheSpecKind:
        return KVCacheSpecKind.UNKNOWN

    @property
    def event_sliding_window(self) -> int | None:
        """The window announced in BlockStored events; None for unwindowed groups."""
        return None

    def max_admission_blocks_per_request(
        self, max_num_batched_tokens: int, max_model_len: int
    ) -> int | None:
        """The most blocks one request can hold at once, for kinds that recycle
        blocks during chunked prefill; None where a request keeps every block."""
        return None


@dataclass(frozen=True, kw_only=True)
class AttentionSpec(KVCacheSpec):
    """Paged attention: K and V for `num_kv_heads` heads of `head_size` per token."""

    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    page_size_padded: int | None = None

    @property
    def real_page_size_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_size * dtype_size(self.dtype)

    @property
    def page_size_bytes(self) -> int:
        real = self.real_page_size_bytes
        if self.page_size_padded is None:
            return real
        if self.page_size_padded < real:
            raise ValueError(f"page_size_padded {self.page_size_padded} < real page size {real}")
        return self.page_size_padded


@dataclass(frozen=True, kw_only=True)
class FullAttentionSpec(AttentionSpec):
    """Every token attends to the whole prefix, so a hit needs every prefix block.

    `sliding_window` and `attention_chunk_size` are vLLM's fields for layers that the
    model computes with a window or in chunks while the cache manager still keeps
    every block (hybrid allocation off): they are recorded, and the hit rules stay
    those of full attention.
    """

    head_size_v: int | None = None
    sliding_window: int | None = None
    attention_chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sliding_window", "attention_chunk_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive when set, got {value}")

    @property
    def real_page_size_bytes(self) -> int:
        head_v = self.head_size if self.head_size_v is None else self.head_size_v
        per_token = self.num_kv_heads * (self.head_size + head_v) * dtype_size(self.dtype)
        return self.block_size * per_token

    @property
    def kind(self) -> KVCacheSpecKind:
        return KVCacheSpecKind.FULL_ATTENTION


@dataclass(frozen=True, kw_only=True)
class MLAAttentionSpec(FullAttentionSpec):
    """Multi-head latent attention: one latent vector per token, no separate V.

    `compress_ratio` tokens share one stored latent (compressed-KV models), which
    shrinks the page; hit rules are those of full attention.
    """

    cache_dtype_str: str | None = None
    compress_ratio: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compress_ratio <= 0 or self.block_size % self.compress_ratio:
            raise ValueError(
                f"compress_ratio {self.compress_ratio} must be positive and divide "
                f"block_size {self.block_size}"
            )

    @property
    def real_page_size_bytes(self) -> int:
        entries = self.block_size // self.compress_ratio
        return entries * self.num_kv_heads * self.head_size * dtype_size(self.dtype)

    @property
    def kind(self) -> KVCacheSpecKind:
        return KVCacheSpecKind.MLA_ATTENTION


@dataclass(frozen=True, kw_only=True)
class SlidingWindowSpec(AttentionSpec):
    """Each token attends to the last `sliding_window` tokens only."""

    sliding_window: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    @property
    def kind(self) -> KVCacheSpecKind:
        return KVCacheSpecKind.SLIDING_WINDOW

    @property
    def event_sliding_window(self) -> int | None:
        return self.sliding_window

    def max_admission_blocks_per_request(
        self, max_num_batched_tokens: int, max_model_len: int
    ) -> int | None:
        # The window's last `sliding_window - 1` tokens plus one chunk, and one
        # more block because the window rarely starts on a block boundary.
        num_tokens = min(self.sliding_window - 1 + max_num_batched_tokens, max_model_len)
        return -(-num_tokens // self.block_size) + 1


MAMBA_CACHE_MODES = ("none", "all", "align")


@dataclass(frozen=True, kw_only=True)
class MambaSpec(KVCacheSpec):
    """Recurrent state: one fixed-size state per request, checkpointed per block.

    With `mamba_cache_mode` "align" a request holds only the state block at the
    end of its scheduled tokens (the rest of its table is the null block); in
    the other modes it holds one block per position, like attention.
    """

    shapes: tuple[int | tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    page_size_padded: int | None = None
    mamba_type: str = "mamba2"
    mamba_cache_mode: str = "none"
    num_speculative_blocks: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mamba_cache_mode not in MAMBA_CACHE_MODES:
            raise ValueError(
                f"mamba_cache_mode must be one of {MAMBA_CACHE_MODES}, "
                f"got {self.mamba_cache_mode!r}"
            )

    @property
    def page_size_bytes(self) -> int:
        shapes = [(s,) if isinstance(s, int) else s for s in self.shapes]
        dtypes = self.dtypes if len(self.dtypes) == len(shapes) else self.dtypes * len(shapes)
        real = sum(math.prod(s) * dtype_size(d) for s, d in zip(shapes, dtypes, strict=True))
        return real if self.page_size_padded is None else self.page_size_padded

    @property
    def kind(self) -> KVCacheSpecKind:
        return KVCacheSpecKind.MAMBA


@dataclass
class KVCacheTensor:
    """One allocated tensor and the layers sharing it."""

    size: int
    shared_by: list[str]


@dataclass
class KVCacheGroupSpec:
    """Layers that share one block table. `is_eagle_group` marks the draft model's
    layers, which need one extra cached block past the hit for EAGLE lookup."""

    layer_names: list[str]
    kv_cache_spec: KVCacheSpec
    is_eagle_group: bool = False


@dataclass
class KVCacheConfig:
    """The whole cache of one engine: a shared pool of `num_blocks` blocks."""

    num_blocks: int
    kv_cache_tensors: list[KVCacheTensor] = field(default_factory=list)
    kv_cache_groups: list[KVCacheGroupSpec] = field(default_factory=list)
