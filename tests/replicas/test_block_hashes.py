"""Block hashes match vLLM's reference vectors and carry the right extra keys."""

from __future__ import annotations

import pytest
import torch

import kvroute.replicas.kv_cache.utils as kv_cache_utils
from kvroute.events.hashing import HASH_FUNCTIONS, get_hash_fn_by_name, hash_fn_name, sha256
from kvroute.replicas.kv_cache.utils import (
    BlockHash,
    BlockHashListWithBlockSize,
    get_request_block_hasher,
    hash_block_tokens,
    init_none_hash,
    maybe_convert_block_hash,
)
from kvroute.replicas.request import (
    LoRARequest,
    MultiModalFeatureSpec,
    MultiModalKwargsItem,
    PlaceholderRange,
    Request,
    SamplingParams,
)

# (NONE_HASH, block0, block0 as event int, block1) per function, seed "0" (docs/vectors.md).
VECTORS = {
    "sha256": (
        "1973e23848344dc43a988a9b478663803cfffe1243480253f9a3cf004b14aa7c",
        "6358e31578a64b75ebe28cdb99d3beae65de82a2087321dc6ec84ae048faaaa6",
        7982712666671721126,
        "3c3c50f324aefbdfbb124dfdc541efac3e94e59c40f4be08afe70601eeca92c8",
    ),
    "sha256_cbor": (
        "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e",
        "d830de3d42c00f25a2949b5d12d98642664a44872c1614c5b0147556276afc9c",
        12687895063098490012,
        "fedd9e4abebebbe6f6cf96b682f08d316063fe2f22a5c552192dd62904fcccac",
    ),
    "xxhash": (
        "6fb31cc38bba6066183f7f2104b9c051",
        "8ef953407c0da43eacbb3639ed2bff4d",
        12446601617588617037,
        "5a51cc5ac3a4b1f7d5efd012fb00201a",
    ),
    "xxhash_cbor": (
        "1ebe36576dcb573f26b99533a20aaeca",
        "209f5d549fc07c8e39d823615ede61ce",
        4168120356241826254,
        "03888914ee75b87e89df867a21beb72b",
    ),
}


def _request(tokens: list[int], block_size: int, fn_name: str = "sha256", **kwargs) -> Request:
    return Request(
        "r",
        tokens,
        SamplingParams(max_tokens=1),
        block_hasher=get_request_block_hasher(block_size, get_hash_fn_by_name(fn_name)),
        **kwargs,
    )


@pytest.mark.parametrize("fn_name", sorted(VECTORS))
def test_block_hash_chain_matches_reference_vectors(fn_name: str) -> None:
    none_hex, block0_hex, block0_int, block1_hex = VECTORS[fn_name]
    fn = get_hash_fn_by_name(fn_name)
    assert init_none_hash(fn, seed="0").hex() == none_hex
    request = _request(list(range(32)), 16, fn_name)
    assert [h.hex() for h in request.block_hashes] == [block0_hex, block1_hex]
    assert maybe_convert_block_hash(request.block_hashes[0]) == block0_int
    assert maybe_convert_block_hash(request.block_hashes[0], use_int=False) == bytes.fromhex(
        block0_hex
    )


def test_none_hash_falls_back_to_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    assert init_none_hash(sha256).hex() == VECTORS["sha256"][0]
    assert kv_cache_utils.NONE_HASH.hex() == VECTORS["sha256"][0]


def test_none_hash_is_random_without_any_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    first, second = init_none_hash(sha256), init_none_hash(sha256)
    assert len(first) == 32 and first != second


def test_hash_functions_are_named_both_ways() -> None:
    for name, fn in HASH_FUNCTIONS.items():
        assert hash_fn_name(fn) == name
    with pytest.raises(ValueError, match="unknown hash function 'md5'"):
        get_hash_fn_by_name("md5")
    with pytest.raises(ValueError, match="not a registered block-hash function"):
        hash_fn_name(len)  # type: ignore[arg-type]


def test_partial_block_is_not_hashed_until_it_fills() -> None:
    init_none_hash(sha256, seed="0")
    request = _request(list(range(20)), 16)
    assert len(request.block_hashes) == 1
    request.append_output_token_ids(list(range(11)))
    assert len(request.block_hashes) == 1
    request.append_output_token_ids(99)
    assert len(request.block_hashes) == 2
    expected = hash_block_tokens(sha256, request.block_hashes[0], [*range(16, 20), *range(11), 99])
    assert request.block_hashes[1] == expected


def test_extra_keys_order_lora_then_multimodal_then_salt() -> None:
    init_none_hash(sha256, seed="0")
    request = _request(
        list(range(32)),
        16,
        lora_request=LoRARequest("adapter", 3),
        cache_salt="tenant-a",
        mm_features=[
            MultiModalFeatureSpec(
                data=MultiModalKwargsItem.dummy(),
                modality="image",
                identifier="img",
                mm_position=PlaceholderRange(offset=10, length=12),
            )
        ],
    )
    first = hash_block_tokens(sha256, None, range(16), ("adapter", ("img", 10), "tenant-a"))
    second = hash_block_tokens(sha256, first, range(16, 32), ("adapter", ("img", -6)))
    assert request.block_hashes == [first, second]


def test_prompt_embeddings_enter_the_hash_per_block() -> None:
    init_none_hash(sha256, seed="0")
    embeds = torch.arange(64, dtype=torch.float32).reshape(32, 2)
    with_embeds = _request(list(range(32)), 16, prompt_embeds=embeds)
    changed = embeds.clone()
    changed[20, 0] = -1.0
    with_changed = _request(list(range(32)), 16, prompt_embeds=changed)
    assert with_embeds.block_hashes[0] == with_changed.block_hashes[0]
    assert with_embeds.block_hashes[1] != with_changed.block_hashes[1]
    assert with_embeds.block_hashes[0] != _request(list(range(32)), 16).block_hashes[0]


def test_larger_block_hash_is_concatenation_of_small_hashes() -> None:
    small = [BlockHash(bytes([i]) * 4) for i in range(7)]
    view = BlockHashListWithBlockSize(small, 16, 32)
    assert len(view) == 3
    assert view[0] == small[0] + small[1]
    assert view[-1] == small[4] + small[5]
    assert view[1:3] == [small[2] + small[3], small[4] + small[5]]
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(ValueError, match="not a multiple of hash_block_size"):
        BlockHashListWithBlockSize(small, 16, 24)


def test_blocks_after_the_last_image_carry_no_multimodal_key() -> None:
    # The image covers tokens 2-5: block 0 names it, blocks 1 and 2 do not.
    init_none_hash(sha256, seed="0")
    request = _request(
        list(range(12)),
        4,
        mm_features=[
            MultiModalFeatureSpec(
                data=MultiModalKwargsItem.dummy(),
                modality="image",
                identifier="img",
                mm_position=PlaceholderRange(offset=2, length=4),
            )
        ],
    )
    first = hash_block_tokens(sha256, None, range(4), (("img", 2),))
    second = hash_block_tokens(sha256, first, range(4, 8), (("img", -2),))
    third = hash_block_tokens(sha256, second, range(8, 12), None)
    assert request.block_hashes == [first, second, third]
