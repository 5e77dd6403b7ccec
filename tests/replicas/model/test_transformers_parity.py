"""Parity with Hugging Face transformers (a dev dependency): the same checkpoint gives
the same logits in transformers' Llama (full attention) and Qwen2 (per-layer sliding
window from `layer_types`) as in this model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kvroute.replicas.model.weights import save_checkpoint
from tests.replicas.model.helpers import dense_logits, engine, executor, settings, tokens


@pytest.mark.parametrize("hybrid", [False, True], ids=["llama", "qwen2-hybrid"])
def test_logits_equal_transformers(tmp_path: Path, hybrid: bool) -> None:
    e = engine(settings(hybrid=hybrid))
    save_checkpoint(executor(e).model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    if hybrid:
        config_file = tmp_path / "config.json"
        hf = json.loads(config_file.read_text())
        hf.update(model_type="qwen2", use_sliding_window=True, max_window_layers=0)
        config_file.write_text(json.dumps(hf))
        for layer in range(4):
            for proj, size in (("q", 32), ("k", 16), ("v", 16)):
                state[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = torch.zeros(size)
        save_file(state, str(tmp_path / "model.safetensors"))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    config._attn_implementation = "eager"
    reference = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    reference.load_state_dict(state, strict=True)
    ids = tokens(3, 40)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(dense_logits(e, ids), expected, rtol=0, atol=1e-4)
