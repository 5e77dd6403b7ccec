"""Parity with Hugging Face transformers (a dev dependency): a checkpoint that
transformers writes, or that kvroute writes, gives the same logits in transformers
as in this model, for each family's own reading of its RoPE and window keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import transformers

from kvroute.replicas.config import GroupConfig, ReplicaSettings
from kvroute.replicas.model.config import ModelLoadError
from kvroute.replicas.model.weights import save_checkpoint
from tests.replicas.model.helpers import (
    VOCAB,
    WINDOW,
    dense_logits,
    engine,
    executor,
    settings,
    tokens,
)

# Long enough that positions pass the scaled RoPE's original context (32) and
# the low frequencies that scaling changes turn by a visible angle.
PROMPT = tokens(3, 120)
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _reference(path: Path) -> torch.Tensor:
    """Logits transformers computes for PROMPT from the checkpoint at `path`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def _with_groups(config: ReplicaSettings, windows: list[int | None]) -> ReplicaSettings:
    kv = {"num_kv_heads": 2, "head_size": 8, "dtype": "float32"}
    groups = [
        GroupConfig(kind="full_attention", **kv)  # type: ignore[arg-type]
        if w is None
        else GroupConfig(kind="sliding_window", sliding_window=w, **kv)  # type: ignore[arg-type]
        for w in windows
    ]
    return msgspec.structs.replace(
        config, model=msgspec.structs.replace(config.model, groups=groups)
    )


def _write_with_transformers(
    path: Path, config: transformers.PretrainedConfig, state: dict[str, torch.Tensor]
) -> None:
    """kvroute's random weights (spread-out logits) saved by transformers itself,
    so config.json is in the format this transformers version writes."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(path))


def _random_state(layers: int, biases: bool = False) -> dict[str, torch.Tensor]:
    state = executor(engine(settings(hybrid=layers == 4))).model.state_dict()
    if biases:
        gen = torch.Generator().manual_seed(1)
        for layer in range(layers):
            for proj, size in (("q", 32), ("k", 16), ("v", 16)):
                name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
                state[name] = torch.randn(size, generator=gen)
    return state


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "hybrid"])
def test_kvroute_checkpoints_load_in_transformers_as_the_same_model(
    tmp_path: Path, hybrid: bool
) -> None:
    """A hybrid is written as Ministral (whose layer_types transformers honours),
    not as Llama (which would ignore the window and compute another model)."""
    e = engine(settings(hybrid=hybrid))
    save_checkpoint(executor(e).model, tmp_path)
    expected_type = "ministral" if hybrid else "llama"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == expected_type
    torch.testing.assert_close(dense_logits(e, PROMPT), _reference(tmp_path), rtol=0, atol=1e-4)


CASES: dict[str, tuple[type[Any], dict[str, Any], list[int | None], bool]] = {
    # name: (transformers config class, its keys, kvroute's group windows, q/k/v biases)
    "llama-theta-500k": (
        transformers.LlamaConfig,
        {"num_hidden_layers": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
        [None],
        False,
    ),
    "llama3-scaling": (
        transformers.LlamaConfig,
        {"num_hidden_layers": 2, "rope_parameters": LLAMA3},
        [None],
        False,
    ),
    "mistral-window": (
        transformers.MistralConfig,
        {"num_hidden_layers": 2, "sliding_window": WINDOW},
        [WINDOW],
        False,
    ),
    "qwen2-max-window-layers": (
        transformers.Qwen2Config,
        {
            "num_hidden_layers": 4,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 2,
        },
        [None, None, WINDOW, WINDOW],
        True,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_transformers_writes_load_to_its_logits(tmp_path: Path, case: str) -> None:
    config_class, keys, windows, biases = CASES[case]
    config = config_class(**SHAPE, **keys, tie_word_embeddings=False)
    _write_with_transformers(tmp_path, config, _random_state(keys["num_hidden_layers"], biases))
    ours = engine(
        _with_groups(
            settings(hybrid=len(windows) > 1, path=str(tmp_path), tokenizer="byte"), windows
        )
    )
    torch.testing.assert_close(dense_logits(ours, PROMPT), _reference(tmp_path), rtol=0, atol=1e-4)


def _edit_config(path: Path, **changes: Any) -> None:
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_transformers_4_rope_keys_load_to_transformers_logits(tmp_path: Path) -> None:
    """transformers 4.x writes theta at the top level and scaling in rope_scaling."""
    config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=2)
    _write_with_transformers(tmp_path, config, _random_state(2))
    file = tmp_path / "config.json"
    hf = json.loads(file.read_text())
    hf.pop("rope_parameters", None)
    rope = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    file.write_text(json.dumps({**hf, "rope_theta": 5e5, "rope_scaling": rope}))
    ours = engine(settings(hybrid=False, path=str(tmp_path), tokenizer="byte"))
    torch.testing.assert_close(dense_logits(ours, PROMPT), _reference(tmp_path), rtol=0, atol=1e-4)


def test_llama_ignores_window_keys_as_transformers_does(tmp_path: Path) -> None:
    """A Llama config with layer_types and sliding_window is full attention in
    transformers: it loads as full attention here, and a windowed group is refused."""
    config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=4)
    _write_with_transformers(tmp_path, config, _random_state(4))
    _edit_config(
        tmp_path,
        sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention"] * 2,
    )
    ours = engine(_with_groups(settings(hybrid=True, path=str(tmp_path), tokenizer="byte"), [None]))
    torch.testing.assert_close(dense_logits(ours, PROMPT), _reference(tmp_path), rtol=0, atol=1e-4)
    with pytest.raises(ModelLoadError, match=r"layer 1 .* was trained with None"):
        engine(settings(hybrid=True, path=str(tmp_path), tokenizer="byte"))
