"""Build the model: seeded random weights, or a local Hugging Face checkpoint.

A checkpoint directory holds config.json, one or more *.safetensors with
Llama-family parameter names, and optionally tokenizer.json. Loading is
strict: a missing or unexpected weight, or one of the wrong shape, is an
error naming it (a silently random layer would serve garbage).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from kvroute.replicas.config import ModelConfig
from kvroute.replicas.model.config import ModelArch, ModelLoadError, model_arch, tokenizer_file
from kvroute.replicas.model.layers import CausalLM

# Buffers some checkpoints carry that this model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: CausalLM
    arch: ModelArch
    tokenizer: Tokenizer | None
    eos_token_ids: tuple[int, ...] = ()


def load_model(config: ModelConfig, device: torch.device) -> LoadedModel:
    """The model the config describes, on `device`, in inference mode."""
    arch = model_arch(config)
    model = CausalLM(arch)
    tokenizer = None
    eos: tuple[int, ...] = ()
    if config.path is None:
        model.init_random(config.init_seed)
    else:
        load_weights(model, Path(config.path))
        file = tokenizer_file(config.tokenizer, config.path)
        tokenizer = None if file is None else load_tokenizer(Path(file), arch)
        eos = eos_token_ids(Path(config.path))
    model = model.to(device=device, dtype=arch.dtype).eval()
    model.rotary.float()  # position tables stay float32 whatever the model dtype
    model.requires_grad_(False)
    model.pack()
    return LoadedModel(model, arch, tokenizer, eos)


def check_checkpoint(path: Path, arch: ModelArch) -> None:
    """The checkpoint's weight names and shapes (read from the safetensors
    headers, no tensor loaded) are exactly those `arch` needs; cheap enough to
    run when a config is loaded, before any replica starts."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model.path: no *.safetensors in {path}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable itself
            shapes.update((n, tuple(handle.get_slice(n).get_shape())) for n in names)
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in CausalLM(arch).state_dict().items()}
    if arch.tie_word_embeddings:
        expected.pop("lm_head.weight")
        shapes.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ModelLoadError(f"{path}: missing weight {missing[0]}" + _more(missing))
    unexpected = sorted(n for n in set(shapes) - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected weight {unexpected[0]}" + _more(unexpected))
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ModelLoadError(
                f"{path}: weight {name} has shape {shapes[name]}, the config needs {shape}"
            )


def load_weights(model: CausalLM, path: Path) -> None:
    """Load a checked checkpoint; a NaN or Inf anywhere is refused by tensor name
    (such a model serves garbage with a 200)."""
    check_checkpoint(path, model.arch)
    expected = model.state_dict()
    if model.arch.tie_word_embeddings:
        expected.pop("lm_head.weight")
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if name in expected:
                if not torch.isfinite(tensor).all():
                    raise ModelLoadError(f"{path}: weight {name} holds NaN or Inf")
                loaded[name] = tensor
    model.load_state_dict(loaded, strict=False)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def eos_token_ids(path: Path) -> tuple[int, ...]:
    """EOS ids of config.json and generation_config.json (an int or a list each)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = path / name
        value = json.loads(file.read_text()).get("eos_token_id") if file.exists() else None
        ids.update([value] if isinstance(value, int) else value or [])
    return tuple(sorted(ids))


def load_tokenizer(file: Path, arch: ModelArch) -> Tokenizer:
    """A tokenizer.json whose ids fit the model's vocabulary."""
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers package raises a bare Exception
        raise ModelLoadError(f"{file}: not a tokenizer: {exc}") from None
    if tokenizer.get_vocab_size() > arch.vocab_size:
        raise ModelLoadError(
            f"{file}: {tokenizer.get_vocab_size()} tokens do not fit the model's "
            f"vocabulary of {arch.vocab_size}"
        )
    return tokenizer


def hf_config(arch: ModelArch) -> dict[str, Any]:
    """A config.json that transformers loads as the same model: Llama when every
    layer attends fully, else Ministral (Llama's weights, with the windowed layers
    listed in `layer_types`); Hugging Face's Llama ignores window keys."""
    windows = {w for w in arch.group_windows if w is not None}
    family: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if windows:
        if arch.attention_bias:
            raise ValueError("a windowed model with q/k/v biases has no transformers class")
        if len(windows) > 1:
            raise ValueError("a Hugging Face config holds one sliding window size")
        family = {
            "model_type": "ministral",
            "architectures": ["MinistralForCausalLM"],
            "sliding_window": windows.pop(),
            "layer_types": [
                "full_attention" if arch.layer_window(i) is None else "sliding_attention"
                for i in range(arch.num_layers)
            ],
        }
    rope = arch.rope_scaling
    if rope is not None:
        family["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(rope)}
    return {
        **family,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_model_len,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_norm_eps,
        "attention_bias": arch.attention_bias,
        "tie_word_embeddings": arch.tie_word_embeddings,
    }


def save_checkpoint(model: CausalLM, path: Path) -> None:
    """Write config.json and model.safetensors that `load_model` reads back."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(model.arch), indent=2))
    # Cloned contiguous: packed projections are views of one tensor, and the LM
    # head a transposed view, neither of which safetensors writes.
    state = {
        n: t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for n, t in model.state_dict().items()
    }
    if model.arch.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"))
