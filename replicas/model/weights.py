"""Build the model: seeded random weights, or a local Hugging Face checkpoint.

A checkpoint directory holds config.json, one or more *.safetensors with
Llama-family parameter names, and optionally tokenizer.json. Loading is
strict: a missing or unexpected weight, or one of the wrong shape, is an
error naming it (a silently random layer would serve garbage).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from kvroute.replicas.config import ModelConfig
from kvroute.replicas.model.config import ModelArch, ModelLoadError, model_arch
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
        tokenizer = load_tokenizer(Path(config.path), arch)
        eos = eos_token_ids(Path(config.path))
    model = model.to(device=device, dtype=arch.dtype).eval()
    model.rotary.float()  # position tables stay float32 whatever the model dtype
    model.requires_grad_(False)
    return LoadedModel(model, arch, tokenizer, eos)


def load_weights(model: CausalLM, path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model.path: no *.safetensors in {path}")
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        loaded.update(load_file(str(file)))
    expected = model.state_dict()
    if model.arch.tie_word_embeddings:
        expected.pop("lm_head.weight")
        loaded.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ModelLoadError(f"{path}: missing weight {missing[0]}" + _more(missing))
    unexpected = sorted(n for n in set(loaded) - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected weight {unexpected[0]}" + _more(unexpected))
    for name, param in expected.items():
        if loaded[name].shape != param.shape:
            raise ModelLoadError(
                f"{path}: weight {name} has shape {tuple(loaded[name].shape)}, "
                f"the config needs {tuple(param.shape)}"
            )
    model.load_state_dict({n: loaded[n] for n in expected}, strict=False)


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


def load_tokenizer(path: Path, arch: ModelArch) -> Tokenizer | None:
    """The checkpoint's tokenizer.json, if any; its ids must fit the vocabulary."""
    file = path / "tokenizer.json"
    if not file.exists():
        return None
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
    """A Llama config.json describing `arch`; a hybrid's windowed layers are
    listed in `layer_types`, Hugging Face's convention for per-layer attention."""
    windows = {w for w in arch.group_windows if w is not None}
    layers: dict[str, Any] = {}
    if windows:
        layers["sliding_window"] = windows.pop()
        if windows:
            raise ValueError("a Hugging Face config holds one sliding window size")
        layers["layer_types"] = [
            "full_attention" if arch.layer_window(i) is None else "sliding_attention"
            for i in range(arch.num_layers)
        ]
    return {
        **layers,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
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
    state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    if model.arch.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"))
