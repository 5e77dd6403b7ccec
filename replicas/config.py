"""What a replica is made of: model (KV cache groups), hashing, engine, events.

Typed msgspec structs: unknown keys and wrong types are errors naming the
offending path. The router's cluster config embeds these sections and hands a
`ReplicaSettings` to each replica actor.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
import torch

from kvroute.replicas.kv_cache.specs import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}


_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_bytes(text: str) -> int:
    """'256MiB' -> 268435456; units B, KiB, MiB, GiB (or none)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]iB|B)?\s*", text)
    if match is None:
        raise ValueError(f"replicas.kv_cache_memory: cannot read {text!r}; write e.g. '256MiB'")
    size = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if size <= 0:
        raise ValueError("replicas.kv_cache_memory must be positive")
    return size


class Struct(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of config structs: unknown keys are errors."""


# Ranges are checked when a config is parsed, before anything starts; an error
# names the key's path (`Expected int >= 1 - at $.replicas.count`).
Positive = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class GroupConfig(Struct):
    """One KV cache group of the model."""

    kind: Literal["full_attention", "sliding_window", "mamba", "mla_attention"]
    block_size: Positive | None = None  # defaults to model.block_size
    num_kv_heads: Positive = 8
    head_size: Positive = 128
    dtype: str = "bfloat16"
    sliding_window: Positive | None = None
    compress_ratio: Positive = 1
    mamba_cache_mode: Literal["none", "all", "align"] = "none"
    is_eagle_group: bool = False

    def spec(self, default_block_size: int) -> KVCacheSpec:
        block_size = self.block_size or default_block_size
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"model.groups: unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}"
            )
        dtype = _DTYPES[self.dtype]
        common = {
            "block_size": block_size,
            "num_kv_heads": self.num_kv_heads,
            "head_size": self.head_size,
            "dtype": dtype,
        }
        if self.kind == "full_attention":
            return FullAttentionSpec(**common)
        if self.kind == "mla_attention":
            return MLAAttentionSpec(**common, compress_ratio=self.compress_ratio)
        if self.kind == "sliding_window":
            if self.sliding_window is None:
                raise ValueError("model.groups: a sliding_window group needs `sliding_window`")
            return SlidingWindowSpec(**common, sliding_window=self.sliding_window)
        return MambaSpec(
            block_size=block_size,
            shapes=((self.num_kv_heads, self.head_size),),
            dtypes=(dtype,),
            mamba_cache_mode=self.mamba_cache_mode,
        )


class ModelConfig(Struct):
    name: str = "tiny-hybrid"
    block_size: Positive = 16
    num_blocks: Positive = 8192
    vocab_size: Positive = 32_000
    max_model_len: Positive = 8192
    groups: list[GroupConfig] = msgspec.field(
        default_factory=lambda: [GroupConfig(kind="full_attention")]
    )
    use_eagle: bool = False
    lora_names: list[str] = msgspec.field(default_factory=list)
    # A Hugging Face tokenizer.json, or "byte" (one token per UTF-8 byte). None:
    # the checkpoint's tokenizer.json with `path` (an error if it has none), else bytes.
    tokenizer: str | None = None
    # The torch executor's model. `path`: a local Hugging Face directory (config.json,
    # *.safetensors of Llama / Mistral / Ministral / Qwen2); None: seeded random
    # weights of the shape below. KV heads and head size come from `groups`, and
    # layer i attends as group i % len(groups) (full attention or sliding window).
    path: str | None = None
    num_layers: Positive = 2
    hidden_size: Positive = 128
    num_heads: Positive = 4
    intermediate_size: Positive = 384
    rope_theta: PositiveFloat = 10_000.0
    rms_norm_eps: PositiveFloat = 1e-5
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # weights and activations
    init_seed: int = 0

    def kv_cache_config(self) -> KVCacheConfig:
        return KVCacheConfig(
            num_blocks=self.num_blocks,
            kv_cache_groups=[
                KVCacheGroupSpec(
                    [f"group{i}"], g.spec(self.block_size), is_eagle_group=g.is_eagle_group
                )
                for i, g in enumerate(self.groups)
            ],
        )

    @property
    def hash_block_size(self) -> int:
        return min(g.block_size or self.block_size for g in self.groups)


class HashingConfig(Struct):
    algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = "sha256"
    seed: str = "kvroute"


class CostConfig(Struct):
    prefill_tokens_per_s: PositiveFloat = 10_000.0
    step_base_s: NonNegativeFloat = 0.004
    decode_s_per_seq: NonNegativeFloat = 0.0002
    kv_read_s_per_block: NonNegativeFloat = 0.000002


class ReplicasConfig(Struct):
    # kvroute's own replica actors; 0 when every engine is external (`external:`).
    count: Annotated[int, msgspec.Meta(ge=0)] = 4
    max_num_seqs: Positive = 64
    max_num_batched_tokens: Positive = 2048
    retention_interval: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # None: vLLM's LRU eviction. A fraction: segmented LRU, where blocks that were
    # hit (or that the router hints it has seen before) are protected and the
    # rest, at least this share of the free queue, are evicted first.
    probation_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = None
    seed: int = 0
    cost: CostConfig = CostConfig()
    num_cpus: NonNegativeFloat = 0.25  # Ray CPUs reserved per replica actor
    # Ray restarts a crashed replica this many times (-1: always); the router's
    # supervisor then starts it and it rejoins the index by registering anew.
    max_restarts: Annotated[int, msgspec.Meta(ge=-1)] = 3
    # "simulated": the cost model above and pseudo-random tokens (simulator, scale
    # tests). "torch": the model section's model runs over paged KV memory.
    executor: Literal["simulated", "torch"] = "simulated"
    enable_prefix_caching: bool = True
    device: str = "auto"  # torch executor: "auto" takes CUDA when present, else CPU
    threads: Annotated[int, msgspec.Meta(ge=1)] = 1  # torch intra-op threads per replica
    # KV memory per replica, e.g. "256MiB": sizes the block pool from the model's
    # page size the way vLLM sizes it from free memory; overrides model.num_blocks.
    kv_cache_memory: str | None = None
    # Debug: fill blocks nobody may read (free and uncached) with NaN every step,
    # so a read of stale KV memory poisons the output.
    poison_free_blocks: bool = False

    def __post_init__(self) -> None:
        self.kv_cache_bytes()  # a malformed size is a config error

    def kv_cache_bytes(self) -> int | None:
        """`kv_cache_memory` in bytes (None when unset)."""
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class EventsConfig(Struct):
    """The event plane. `security: curve` (the default) encrypts every event socket
    and lets only the cluster's routers connect: each replica makes its own key pair
    at start, and the launcher hands the routers' key pair to routers and replicas
    through Ray. `none` sends tenants' tokens in clear, so it is refused on a
    non-loopback host unless `allow_insecure` says that is meant."""

    transport: Literal["tcp", "ipc"] = "tcp"
    host: str = "127.0.0.1"
    hwm: Positive = 100_000
    buffer_steps: Positive = 10_000
    max_queue_size: Positive = 100_000
    security: Literal["curve", "none"] = "curve"
    allow_insecure: bool = False
    # BlockStored carries the blocks' token ids (vLLM's format). kvroute's router
    # indexes by hash alone: false keeps prompts off the event plane entirely.
    publish_token_ids: bool = True
    # Replay requests each replica answers per second; past it, a router resyncs.
    max_replays_per_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0

    def __post_init__(self) -> None:
        exposed = self.transport == "tcp" and self.host not in LOOPBACK_HOSTS
        if self.security == "none" and exposed and not self.allow_insecure:
            raise ValueError(
                f"events.security: none on host {self.host} would publish prompts in clear "
                "off this machine; use security: curve, or set allow_insecure: true"
            )


class ReplicaSettings(Struct):
    """Everything one replica actor needs to build its engine and publisher."""

    model: ModelConfig
    hashing: HashingConfig
    replicas: ReplicasConfig
    events: EventsConfig
    namespace: str = "kvroute"
