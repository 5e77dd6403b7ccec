"""The model's architecture, from kvroute's model section or a checkpoint's config.json.

Invariants checked here, before any tensor exists: every KV cache group is an
attention kind the torch executor computes (full or sliding window), every
group stores K/V of the model's own shape, and all groups share one page
layout (so one block pool can back them, as in vLLM's hybrid allocator).
Layer i belongs to group i % len(groups).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvroute.replicas.config import ModelConfig
from kvroute.replicas.kv_cache.specs import AttentionSpec, KVCacheSpecKind, SlidingWindowSpec

COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTABLE_KINDS = (KVCacheSpecKind.FULL_ATTENTION, KVCacheSpecKind.SLIDING_WINDOW)
# Hugging Face model types whose weights use the Llama parameter names.
LLAMA_FAMILY = {"llama": False, "mistral": False, "qwen2": True}  # value: q/k/v have a bias


class ModelLoadError(ValueError):
    """A model the torch executor cannot build; the message names the cause."""


@dataclass(frozen=True)
class ModelArch:
    """Everything that shapes the weights and the forward pass."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_model_len: int
    rope_theta: float
    rms_norm_eps: float
    dtype: torch.dtype
    attention_bias: bool
    tie_word_embeddings: bool
    # Per KV cache group: its sliding window, or None for full attention.
    group_windows: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_layers < len(self.group_windows):
            raise ModelLoadError(
                f"{self.num_layers} layers cannot cover {len(self.group_windows)} KV cache groups"
            )

    def layer_group(self, layer: int) -> int:
        return layer % len(self.group_windows)

    def layer_window(self, layer: int) -> int | None:
        return self.group_windows[self.layer_group(layer)]

    @property
    def layers_per_group(self) -> int:
        """Layers of the largest group: the number of shared K/V tensor pairs."""
        return -(-self.num_layers // len(self.group_windows))


def attention_specs(model: ModelConfig) -> list[AttentionSpec]:
    """The groups' specs, refusing kinds the executor cannot compute and
    groups that cannot share one page layout."""
    if model.use_eagle or any(g.is_eagle_group for g in model.groups):
        raise ModelLoadError("model.use_eagle: the torch executor runs no EAGLE draft model")
    specs: list[AttentionSpec] = []
    for i, group in enumerate(model.groups):
        spec = group.spec(model.block_size)
        if spec.kind not in COMPUTABLE_KINDS or not isinstance(spec, AttentionSpec):
            raise ModelLoadError(
                f"model.groups[{i}] is a {group.kind} group: the torch executor computes "
                "only full_attention and sliding_window groups"
            )
        if spec.dtype not in COMPUTE_DTYPES.values():
            raise ModelLoadError(
                f"model.groups[{i}] stores K/V as {group.dtype}: the torch executor "
                f"stores {sorted(COMPUTE_DTYPES)}"
            )
        specs.append(spec)
    first = specs[0]
    for i, spec in enumerate(specs[1:], start=1):
        layout = (spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype)
        if layout != (first.block_size, first.num_kv_heads, first.head_size, first.dtype):
            raise ModelLoadError(
                f"model.groups[{i}] stores {layout[1:]} (heads, head size, dtype) per token in "
                f"blocks of {layout[0]}; every group must share group 0's page layout"
            )
    return specs


def _windows(specs: list[AttentionSpec]) -> tuple[int | None, ...]:
    return tuple(s.sliding_window if isinstance(s, SlidingWindowSpec) else None for s in specs)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"model.path: no config.json in {path}") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return data


def model_arch(model: ModelConfig) -> ModelArch:
    """The architecture: from `model.path`'s config.json if set, else the model section."""
    specs = attention_specs(model)
    kv = specs[0]
    if model.path is None:
        arch = ModelArch(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            num_kv_heads=kv.num_kv_heads,
            head_dim=kv.head_size,
            intermediate_size=model.intermediate_size,
            max_model_len=model.max_model_len,
            rope_theta=model.rope_theta,
            rms_norm_eps=model.rms_norm_eps,
            dtype=COMPUTE_DTYPES[model.dtype],
            attention_bias=False,
            tie_word_embeddings=False,
            group_windows=_windows(specs),
        )
    else:
        arch = _arch_from_hf(read_hf_config(model.path), model, specs)
    for i, spec in enumerate(specs):
        if (spec.num_kv_heads, spec.head_size) != (arch.num_kv_heads, arch.head_dim):
            raise ModelLoadError(
                f"model.groups[{i}] stores {spec.num_kv_heads} KV heads of size "
                f"{spec.head_size}, but the model has {arch.num_kv_heads} of size {arch.head_dim}"
            )
    return arch


def _arch_from_hf(hf: dict[str, Any], model: ModelConfig, specs: list[AttentionSpec]) -> ModelArch:
    model_type = hf.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ModelLoadError(
            f"{model.path}: model_type {model_type!r} is not one of {sorted(LLAMA_FAMILY)}"
        )
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        arch_max_len = int(hf.get("max_position_embeddings", model.max_model_len))
        arch = ModelArch(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf["intermediate_size"]),
            max_model_len=model.max_model_len,
            rope_theta=float(hf.get("rope_theta", 10_000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            dtype=COMPUTE_DTYPES[model.dtype],
            attention_bias=bool(hf.get("attention_bias", LLAMA_FAMILY[model_type])),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            group_windows=_windows(specs),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{model.path}/config.json: missing {exc.args[0]!r}") from None
    if hf.get("rope_scaling"):
        raise ModelLoadError(f"{model.path}: rope_scaling is not supported")
    _check_windows(hf, model, arch)
    if arch.vocab_size != model.vocab_size:
        raise ModelLoadError(
            f"model.vocab_size is {model.vocab_size}, but {model.path} has {arch.vocab_size}"
        )
    if model.max_model_len > arch_max_len:
        raise ModelLoadError(
            f"model.max_model_len {model.max_model_len} exceeds the checkpoint's "
            f"max_position_embeddings {arch_max_len}"
        )
    return arch


def _check_windows(hf: dict[str, Any], model: ModelConfig, arch: ModelArch) -> None:
    """Every layer must attend as the checkpoint was trained: a sliding-window
    group over a full-attention layer (or the reverse) is another model. Per-layer
    kinds come from `layer_types` (Hugging Face's hybrid convention), else one
    window for all layers (Mistral; Qwen2 with use_sliding_window). A window of
    at least max_model_len is full attention."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if hf.get("model_type") == "qwen2" and hf.get("use_sliding_window"):
            raise ModelLoadError(f"{model.path}: Qwen2's max_window_layers is not supported")
        uniform = hf.get("model_type") == "mistral" or hf.get("use_sliding_window")
        layer_types = ["sliding_attention" if uniform and window else "full_attention"] * (
            arch.num_layers
        )
    if len(layer_types) != arch.num_layers:
        raise ModelLoadError(f"{model.path}: layer_types does not list {arch.num_layers} layers")

    def effective(w: int | None) -> int | None:
        return None if w is None or w >= model.max_model_len else w

    for layer, kind in enumerate(layer_types):
        trained = effective(window if kind == "sliding_attention" else None)
        mine = effective(arch.layer_window(layer))
        if mine != trained:
            raise ModelLoadError(
                f"model.groups[{arch.layer_group(layer)}] attends with sliding window {mine}, "
                f"but layer {layer} of {model.path} was trained with {trained}"
            )
