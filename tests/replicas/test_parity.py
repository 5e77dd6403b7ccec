"""Block-manager behaviour that must match vLLM's: prompt embeddings and spec fields."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kvroute.events.hashing import sha256
from kvroute.replicas.kv_cache.specs import FullAttentionSpec
from kvroute.replicas.kv_cache.utils import get_request_block_hasher, hash_block_tokens
from kvroute.replicas.request import Request, SamplingParams
from tests.replicas.conftest import manager

# bfloat16 bit patterns, little-endian: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00, 3.0 = 0x4040.
BF16_ROWS = [[1.0, -2.0], [0.5, 3.0]]
BF16_BYTES = b"\x80\x3f\x00\xc0\x00\x3f\x40\x40"


def embeds_request(embeds: torch.Tensor, block_size: int = 2) -> Request:
    return Request(
        "embeds",
        None,
        SamplingParams(max_tokens=1),
        prompt_embeds=embeds,
        block_hasher=get_request_block_hasher(block_size, sha256),
    )


def test_prompt_given_only_as_embeddings_counts_its_rows_as_token_zero() -> None:
    request = embeds_request(torch.zeros(5, 3))
    assert request.prompt_token_ids is None
    assert (request.num_prompt_tokens, request.num_tokens) == (5, 5)
    assert request.all_token_ids == [0, 0, 0, 0, 0]
    assert len(request.block_hashes) == 2


def test_bfloat16_embeddings_hash_their_raw_bytes_as_vllm_does() -> None:
    embeds = torch.tensor(BF16_ROWS * 2, dtype=torch.bfloat16)
    request = embeds_request(embeds)
    digest = hashlib.sha256(BF16_BYTES).digest()
    first = hash_block_tokens(sha256, None, [0, 0], (digest,))
    assert request.block_hashes == [first, hash_block_tokens(sha256, first, [0, 0], (digest,))]


def test_float32_embeddings_hash_their_raw_bytes() -> None:
    embeds = torch.tensor([[1.0], [2.0]], dtype=torch.float32)
    digest = hashlib.sha256(embeds.numpy().tobytes()).digest()
    assert embeds_request(embeds).block_hashes == [
        hash_block_tokens(sha256, None, [0, 0], (digest,))
    ]


def test_embeddings_only_prompt_is_cached_and_hit_by_an_equal_one() -> None:
    kv = manager(
        16, FullAttentionSpec(block_size=2, num_kv_heads=1, head_size=1, dtype=torch.float32)
    )
    embeds = torch.arange(10, dtype=torch.bfloat16).reshape(5, 2)
    first = embeds_request(embeds)
    assert kv.get_computed_blocks(first)[1] == 0
    assert kv.allocate_slots(first, first.num_tokens) is not None
    kv.free(first)
    assert kv.get_computed_blocks(embeds_request(embeds.clone()))[1] == 4
    assert kv.get_computed_blocks(embeds_request(embeds + 1))[1] == 0


def test_request_without_tokens_or_embeddings_is_refused() -> None:
    with pytest.raises(ValueError, match="needs prompt_token_ids or prompt_embeds"):
        Request("empty", None, SamplingParams(max_tokens=1))


def test_full_attention_spec_takes_vllms_window_and_chunk_fields() -> None:
    spec = FullAttentionSpec(
        block_size=16,
        num_kv_heads=1,
        head_size=8,
        dtype=torch.float16,
        sliding_window=128,
        attention_chunk_size=256,
    )
    assert (spec.sliding_window, spec.attention_chunk_size) == (128, 256)
    assert spec.kind == "full_attention"


@pytest.mark.parametrize("field", ["sliding_window", "attention_chunk_size"])
def test_full_attention_spec_refuses_a_non_positive_window_or_chunk(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be positive when set, got 0"):
        FullAttentionSpec(
            block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float16, **{field: 0}
        )
