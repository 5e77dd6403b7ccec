"""configs/hf-llama.yaml, the README's "Serve a Hugging Face checkpoint" example:
refused as shipped (its path is a placeholder), and pointed at a checkpoint with
Llama 3.2 1B's config keys (a tiny random one written here), it loads and serves."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import transformers
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from kvroute.replicas.clock import VirtualClock
from kvroute.replicas.factory import build_engine
from kvroute.replicas.request import SamplingParams
from kvroute.router.config import ConfigError, load_config, parse_config
from tests.replicas.model.helpers import run

EXAMPLE = Path(__file__).resolve().parents[3] / "configs" / "hf-llama.yaml"
PLACEHOLDER = "/path/to/Llama-3.2-1B"

# Llama 3.2 1B's config.json keys, with tiny hidden sizes and 2 layers (the
# example config does not name those: they come from the checkpoint).
LLAMA_3_2_1B = {
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
}


def test_the_example_is_refused_until_its_path_names_a_checkpoint() -> None:
    assert PLACEHOLDER in EXAMPLE.read_text()
    with pytest.raises(ConfigError, match=f"no config.json in {PLACEHOLDER}"):
        load_config(EXAMPLE)


def test_the_example_serves_a_checkpoint_with_llama_3_2_keys(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**LLAMA_3_2_1B)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(["serve the checkpoint from its directory"] * 4, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = EXAMPLE.read_text().replace(PLACEHOLDER, str(tmp_path))
    parsed = parse_config(yaml.safe_load(text), "hf-llama.yaml")
    assert parsed.model.path == str(tmp_path)
    settings = parsed.replica_settings()
    small = msgspec.structs.replace(settings.replicas, kv_cache_memory="4MiB", device="cpu")
    engine = build_engine(
        msgspec.structs.replace(settings, replicas=small), VirtualClock(), events=False
    )
    ids = tokenizer.encode("serve the checkpoint").ids
    engine.add_request("r", ids, SamplingParams(max_tokens=3, temperature=0.0))
    assert len(run(engine)["r"].output_token_ids) == 3
