"""The model's architecture, from kvroute's model section or a checkpoint's config.json.

Invariants checked here, before any tensor exists: every KV cache group is an
attention kind the torch executor computes (full or sliding window), every
group stores K/V of the model's own shape, and all groups share one page
layout (so one block pool can back them, as in vLLM's hybrid allocator).
Layer i belongs to group i % len(groups).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvroute.replicas.config import ModelConfig
from kvroute.replicas.kv_cache.specs import AttentionSpec, KVCacheSpecKind, SlidingWindowSpec

COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTABLE_KINDS = (KVCacheSpecKind.FULL_ATTENTION, KVCacheSpecKind.SLIDING_WINDOW)
# Hugging Face model types whose weights use the Llama parameter names.
LLAMA_FAMILY = ("llama", "mistral", "ministral", "qwen2")
# The `model.tokenizer` value that asks for one token per UTF-8 byte.
BYTE_TOKENIZER = "byte"
# transformers' defaults for keys a config.json may leave out.
_DEFAULT_THETA = 10_000.0
_DEFAULT_WINDOW = 4096  # Mistral, Ministral and Qwen2's `sliding_window`
_DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2


class ModelLoadError(ValueError):
    """A model the torch executor cannot build; the message names the cause."""


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.x RoPE scaling (`rope_type: llama3`): frequencies whose wavelength
    exceeds original_max_position_embeddings / low_freq_factor are divided by
    `factor`, those under original / high_freq_factor are kept, and those between
    are interpolated linearly in original / wavelength."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def scale(self, inv_freq: torch.Tensor) -> torch.Tensor:
        wavelength = 2 * math.pi / inv_freq
        ratio = self.original_max_position_embeddings / wavelength
        smooth = (ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        long_waves = wavelength > self.original_max_position_embeddings / self.low_freq_factor
        short_waves = wavelength < self.original_max_position_embeddings / self.high_freq_factor
        return torch.where(
            long_waves, inv_freq / self.factor, torch.where(short_waves, inv_freq, blended)
        )


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
    rope_scaling: Llama3Rope | None = None

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
    where = model.path
    model_type = hf.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not one of {LLAMA_FAMILY}")
    _refuse_unsupported(hf, where)
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        arch_max_len = int(hf.get("max_position_embeddings", model.max_model_len))
        theta, scaling = _rope(hf, where, arch_max_len)
        arch = ModelArch(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf["intermediate_size"]),
            max_model_len=model.max_model_len,
            rope_theta=theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            dtype=COMPUTE_DTYPES[model.dtype],
            attention_bias=_attention_bias(hf, model_type),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            group_windows=_windows(specs),
            rope_scaling=scaling,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{where}/config.json: missing {exc.args[0]!r}") from None
    _check_windows(trained_windows(hf, arch.num_layers, where), model, arch)
    if arch.vocab_size != model.vocab_size:
        raise ModelLoadError(
            f"model.vocab_size is {model.vocab_size}, but {where} has {arch.vocab_size}"
        )
    if model.max_model_len > arch_max_len:
        raise ModelLoadError(
            f"model.max_model_len {model.max_model_len} exceeds the checkpoint's "
            f"max_position_embeddings {arch_max_len}"
        )
    return arch


def _refuse_unsupported(hf: dict[str, Any], where: object) -> None:
    """Keys that would make this a different network than the one computed here."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if hf.get("model_type") == "llama" and hf.get("mlp_bias"):
        raise ModelLoadError(f"{where}: mlp_bias is not supported")


def _attention_bias(hf: dict[str, Any], model_type: str) -> bool:
    """Whether q/k/v have biases, as each family's transformers class decides:
    Qwen2 always, Mistral and Ministral never, Llama as `attention_bias` says."""
    if model_type == "qwen2":
        return True
    return model_type == "llama" and bool(hf.get("attention_bias", False))


def _rope(hf: dict[str, Any], where: object, max_positions: int) -> tuple[float, Llama3Rope | None]:
    """(theta, scaling) from wherever transformers puts them: transformers 5's
    `rope_parameters` (theta inside), 4.x's `rope_scaling` beside a top-level
    `rope_theta`. Every rope_type but default and llama3 is refused by name:
    served unscaled it would change every logit past the first positions."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"{where}: RoPE parameters per layer type are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if float(partial) != 1.0:
        raise ModelLoadError(f"{where}: partial_rotary_factor {partial} is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(
            f"{where}: rope_type {rope_type!r} is not supported (default and llama3 are)"
        )
    original = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", max_positions
    )
    try:
        scaling = Llama3Rope(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(original),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{where}: llama3 RoPE scaling needs {exc.args[0]!r}") from None
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ModelLoadError(f"{where}: llama3 RoPE needs high_freq_factor > low_freq_factor")
    return theta, scaling


def trained_windows(hf: dict[str, Any], num_layers: int, where: object) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model_type's
    transformers class reads its config: Llama ignores every window key; Mistral
    windows all layers by `sliding_window` (ignoring `layer_types`); Ministral and
    Qwen2 follow `layer_types`, else Ministral windows every layer and Qwen2 the
    layers from `max_window_layers` on, and Qwen2 only with `use_sliding_window`."""
    model_type = hf.get("model_type")
    if model_type == "llama":
        return [None] * num_layers
    window: int | None = hf.get("sliding_window", _DEFAULT_WINDOW)
    if model_type == "mistral":
        return [window] * num_layers
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if model_type == "qwen2":
        first = int(hf.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS))
        default = [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        ]
    else:
        default = ["sliding_attention"] * num_layers
    layer_types = hf.get("layer_types") or default
    if len(layer_types) != num_layers:
        raise ModelLoadError(f"{where}: layer_types does not list {num_layers} layers")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelLoadError(f"{where}: layer type {sorted(unknown)[0]!r} is not supported")
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def _check_windows(trained: list[int | None], model: ModelConfig, arch: ModelArch) -> None:
    """Every layer must attend as the checkpoint was trained: a sliding-window
    group over a full-attention layer (or the reverse) is another model. A window
    of at least max_model_len is full attention."""

    def effective(w: int | None) -> int | None:
        return None if w is None or w >= model.max_model_len else w

    for layer, window in enumerate(trained):
        mine = effective(arch.layer_window(layer))
        if mine != effective(window):
            raise ModelLoadError(
                f"model.groups[{arch.layer_group(layer)}] attends with sliding window {mine}, "
                f"but layer {layer} of {model.path} was trained with {effective(window)}"
            )


def tokenizer_file(tokenizer: str | None, model_path: str | None) -> str | None:
    """The tokenizer.json that router and replicas use, None for one token per
    UTF-8 byte: `model.tokenizer` when it names a file, the byte tokenizer when it
    says `byte` or no checkpoint is set (seeded weights), else the checkpoint's
    own tokenizer.json, which must exist: bytes are not the checkpoint's tokens."""
    if tokenizer == BYTE_TOKENIZER:
        return None
    if tokenizer is not None:
        return tokenizer
    if model_path is None:
        return None
    file = Path(model_path) / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(
            f"model.path {model_path} has no tokenizer.json: set model.tokenizer to the "
            f"checkpoint's tokenizer.json, or to {BYTE_TOKENIZER!r} for one token per byte"
        )
    return str(file)
