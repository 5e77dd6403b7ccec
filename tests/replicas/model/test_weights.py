"""Weights and tokenizer load for real from a local Hugging Face directory, and
bad model input is refused with an error that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from kvroute.replicas.config import ReplicaSettings
from kvroute.replicas.model.config import ModelLoadError, tokenizer_file
from kvroute.replicas.model.weights import save_checkpoint
from kvroute.replicas.request import SamplingParams
from kvroute.router.config import ConfigError, parse_config
from kvroute.router.openai.tokenizer import HFTokenizer
from tests.replicas.model.helpers import (
    VOCAB,
    dense_logits,
    engine,
    executor,
    run,
    settings,
    tokens,
)

TEXT = ["the cache keeps the blocks", "a router sends the request", "the block is in the cache"]


def _write_tokenizer(path: Path) -> None:
    """A small BPE tokenizer trained here, saved as tokenizer.json."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(TEXT * 4, trainer)
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny hybrid model's random weights saved as a Llama checkpoint."""
    source = engine(settings(hybrid=True))
    save_checkpoint(executor(source).model, tmp_path)
    _write_tokenizer(tmp_path)
    return tmp_path


def _with_group(config: ReplicaSettings, index: int, **changes: object) -> ReplicaSettings:
    groups = list(config.model.groups)
    groups[index] = msgspec.structs.replace(groups[index], **changes)
    return msgspec.structs.replace(
        config, model=msgspec.structs.replace(config.model, groups=groups)
    )


def _edit_config(path: Path, **changes: object) -> None:
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _as_config(config: ReplicaSettings) -> dict[str, object]:
    """The replica sections as a cluster config file's data."""
    sections = msgspec.to_builtins(config)
    return {"model": sections["model"], "replicas": sections["replicas"]}


def test_saved_checkpoint_reloads_to_identical_logits(checkpoint: Path) -> None:
    original = engine(settings(hybrid=True))
    reloaded = engine(settings(hybrid=True, path=str(checkpoint)))
    prompt = tokens(5, 40)
    assert torch.equal(dense_logits(original, prompt), dense_logits(reloaded, prompt))


def test_checkpoint_tokenizer_encodes_prompts_the_model_serves(checkpoint: Path) -> None:
    e = engine(settings(hybrid=True, path=str(checkpoint)))
    tokenizer = executor(e).tokenizer
    assert tokenizer is not None
    ids = tokenizer.encode("the router keeps the cache").ids
    assert ids and max(ids) < VOCAB
    e.add_request("text", ids, SamplingParams(max_tokens=3, temperature=0.0))
    assert len(run(e)["text"].output_token_ids) == 3


def test_the_checkpoint_eos_token_stops_requests_unless_ignored(checkpoint: Path) -> None:
    e = engine(settings(hybrid=True, path=str(checkpoint)))
    prompt = tokens(9, 11)
    e.add_request("free", prompt, SamplingParams(max_tokens=6, temperature=0.0))
    free = run(e)["free"].output_token_ids
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[2]]}))
    e = engine(settings(hybrid=True, path=str(checkpoint)))
    e.add_request("eos", prompt, SamplingParams(max_tokens=6, temperature=0.0))
    ignoring = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    e.add_request("ignoring", prompt, ignoring)
    outputs = run(e)
    assert outputs["eos"].finish_reason == "stop"
    assert outputs["eos"].output_token_ids == free[: free.index(free[2]) + 1]
    assert outputs["ignoring"].output_token_ids == free


@pytest.mark.parametrize("kind", ["mamba", "mla_attention"])
def test_a_group_the_executor_cannot_compute_is_refused_by_name(kind: str) -> None:
    config = _with_group(settings(hybrid=True), 1, kind=kind)
    with pytest.raises(ModelLoadError, match=rf"model.groups\[1\] is a {kind} group"):
        engine(config)


def test_an_eagle_model_is_refused() -> None:
    config = settings(hybrid=False)
    config = msgspec.structs.replace(
        config, model=msgspec.structs.replace(config.model, use_eagle=True)
    )
    with pytest.raises(ModelLoadError, match="no EAGLE draft model"):
        engine(config)


def test_a_kv_dtype_the_executor_cannot_store_is_refused() -> None:
    config = _with_group(settings(hybrid=True), 0, dtype="uint8")
    with pytest.raises(ModelLoadError, match=r"model.groups\[0\] stores K/V as uint8"):
        engine(config)


def test_a_group_whose_kv_shape_differs_from_the_checkpoint_is_refused(checkpoint: Path) -> None:
    config = _with_group(settings(hybrid=True, path=str(checkpoint)), 1, num_kv_heads=4)
    with pytest.raises(ModelLoadError, match=r"model.groups\[1\]"):
        engine(config)


def test_a_missing_weight_is_named(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    state = load_file(str(file))
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, str(file))
    with pytest.raises(ModelLoadError, match=r"missing weight model.layers.2.mlp.up_proj.weight"):
        engine(settings(hybrid=True, path=str(checkpoint)))


def test_a_weight_of_the_wrong_shape_is_named(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 65)
    save_file(state, str(file))
    with pytest.raises(ModelLoadError, match=r"down_proj.weight has shape \(32, 65\)"):
        engine(settings(hybrid=True, path=str(checkpoint)))


def test_a_checkpoint_of_another_vocabulary_or_family_is_refused(checkpoint: Path) -> None:
    config_file = checkpoint / "config.json"
    hf = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**hf, "vocab_size": 200}))
    with pytest.raises(ModelLoadError, match=r"model.vocab_size is 96, but .* has 200"):
        engine(settings(hybrid=True, path=str(checkpoint)))
    config_file.write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2'"):
        engine(settings(hybrid=True, path=str(checkpoint)))


def test_qwen2_checkpoints_carry_attention_biases(checkpoint: Path) -> None:
    """Qwen2 has q/k/v biases: they must be in the file, and they are used."""
    config_file = checkpoint / "config.json"
    hf = json.loads(config_file.read_text())
    del hf["attention_bias"]  # Qwen2 configs do not say it: the family implies it
    qwen2 = {"model_type": "qwen2", "use_sliding_window": True}
    config_file.write_text(json.dumps({**hf, **qwen2, "attention_bias": False}))
    with pytest.raises(
        ModelLoadError, match=r"missing weight model.layers.0.self_attn.k_proj.bias"
    ):
        engine(settings(hybrid=True, path=str(checkpoint)))
    file = checkpoint / "model.safetensors"
    state = load_file(str(file))
    for layer in range(4):
        for proj, size in (("q", 32), ("k", 16), ("v", 16)):
            state[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = torch.full((size,), 0.5)
    save_file(state, str(file))
    qwen = engine(settings(hybrid=True, path=str(checkpoint)))
    plain = engine(settings(hybrid=True))
    prompt = tokens(6, 12)
    assert not torch.allclose(dense_logits(qwen, prompt), dense_logits(plain, prompt))


def test_groups_must_attend_as_the_checkpoint_was_trained(checkpoint: Path) -> None:
    """The saved hybrid lists its windowed layers in layer_types: a model section
    whose groups attend otherwise is refused, and so is a Mistral-wide window."""
    with pytest.raises(ModelLoadError, match=r"model.groups\[0\] attends with sliding window None"):
        engine(settings(hybrid=False, path=str(checkpoint)))  # layers 1, 3 were windowed
    config_file = checkpoint / "config.json"
    hf = json.loads(config_file.read_text())
    assert hf["layer_types"][:2] == ["full_attention", "sliding_attention"]
    del hf["layer_types"]
    config_file.write_text(json.dumps({**hf, "model_type": "mistral"}))
    with pytest.raises(ModelLoadError, match=r"model.groups\[0\] .* layer 0 .* trained with 7"):
        engine(settings(hybrid=True, path=str(checkpoint)))


@pytest.mark.parametrize(
    ("key", "rope"),
    [
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}),
    ],
)
def test_rope_types_other_than_default_and_llama3_are_refused_by_name(
    checkpoint: Path, key: str, rope: dict[str, object]
) -> None:
    _edit_config(checkpoint, **{key: rope})
    kind = rope.get("rope_type", rope.get("type"))
    with pytest.raises(ModelLoadError, match=rf"rope_type '{kind}' is not supported"):
        engine(settings(hybrid=True, path=str(checkpoint)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
            "RoPE parameters per layer type are not supported",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 RoPE scaling needs"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_config_keys_that_change_the_network_are_refused_by_name(
    checkpoint: Path, changes: dict[str, object], message: str
) -> None:
    _edit_config(checkpoint, **changes)
    with pytest.raises(ModelLoadError, match=message):
        engine(settings(hybrid=True, path=str(checkpoint)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_weight_holding_nan_or_inf_is_refused_by_name(checkpoint: Path, bad: float) -> None:
    file = checkpoint / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.3.self_attn.o_proj.weight"][5, 7] = bad
    save_file(state, str(file))
    with pytest.raises(
        ModelLoadError, match=r"weight model.layers.3.self_attn.o_proj.weight holds NaN or Inf"
    ):
        engine(settings(hybrid=True, path=str(checkpoint)))


def test_a_checkpoint_without_tokenizer_json_needs_the_byte_tokenizer_by_name(
    checkpoint: Path,
) -> None:
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer.json: set model.tokenizer"):
        engine(settings(hybrid=True, path=str(checkpoint)))
    with pytest.raises(ConfigError, match=r"has no tokenizer.json"):
        parse_config(_as_config(settings(hybrid=True, path=str(checkpoint))))
    e = engine(settings(hybrid=True, path=str(checkpoint), tokenizer="byte"))
    assert executor(e).tokenizer is None
    assert tokenizer_file("byte", str(checkpoint)) is None


def test_a_corrupt_tokenizer_json_is_named_by_replica_and_router(checkpoint: Path) -> None:
    file = checkpoint / "tokenizer.json"
    file.write_text('{"version": "1.0", 7: "x"}')
    with pytest.raises(ModelLoadError, match=rf"{file}: not a tokenizer"):
        engine(settings(hybrid=True, path=str(checkpoint)))
    with pytest.raises(ValueError, match=rf"{file}: not a tokenizer.json"):
        HFTokenizer(file)


def test_weight_shapes_are_checked_when_the_config_loads(checkpoint: Path) -> None:
    """Before any replica (or Ray) starts: the router's config parse reads the
    safetensors headers and names the first weight that does not fit."""
    file = checkpoint / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(64, 31)
    save_file(state, str(file))
    with pytest.raises(
        ConfigError, match=r"weight model.layers.1.mlp.gate_proj.weight has shape \(64, 31\)"
    ):
        parse_config(_as_config(settings(hybrid=True, path=str(checkpoint))))
