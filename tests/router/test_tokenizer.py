"""The router tokenizes exactly as the replicas' checkpoint does, or block hashes would differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvroute.replicas.model.config import ModelArch
from kvroute.replicas.model.weights import load_tokenizer as load_checkpoint_tokenizer
from kvroute.router.openai.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_file

ARCH = ModelArch(
    vocab_size=300,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    intermediate_size=32,
    max_model_len=64,
    rope_theta=10_000.0,
    rms_norm_eps=1e-6,
    dtype=torch.float32,
    attention_bias=False,
    tie_word_embeddings=False,
    group_windows=(None,),
)
TEXTS = ["héllo wörld ✓ 日本語", "<s>system</s> be brief", "plain ascii text"]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A byte-level BPE with special tokens, trained here on multi-byte text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 8, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_the_router_finds_the_checkpoints_tokenizer_by_the_model_path(model_dir: Path) -> None:
    assert tokenizer_file(None, str(model_dir)) == str(model_dir / "tokenizer.json")
    assert tokenizer_file("/x/tokenizer.json", str(model_dir)) == "/x/tokenizer.json"
    assert tokenizer_file(None, None) is None
    assert tokenizer_file("byte", str(model_dir)) is None


@pytest.mark.parametrize("text", TEXTS)
def test_router_and_replica_give_the_same_ids_for_multibyte_and_special_tokens(
    model_dir: Path, text: str
) -> None:
    router = HFTokenizer(tokenizer_file(None, str(model_dir)) or "")
    replica = load_checkpoint_tokenizer(model_dir / "tokenizer.json", ARCH)
    ids = router.encode(text)
    assert ids == replica.encode(text).ids
    assert router.decode(ids) == replica.decode(ids)


def test_special_tokens_are_single_ids(model_dir: Path) -> None:
    router = HFTokenizer(model_dir / "tokenizer.json")
    assert router.encode("<s>")[0] == router.encode("<s>hi")[0]
    assert len(router.encode("<s>")) == 1


def test_the_byte_fallback_round_trips_utf8() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("é✓") == [0xC3, 0xA9, 0xE2, 0x9C, 0x93]
    assert tokenizer.decode(tokenizer.encode("é✓")) == "é✓"
