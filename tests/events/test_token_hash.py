"""`xxh64_tokens`: the router-owned block hash, compiled over a whole prompt.

The compiled chain must give, block for block, the bytes that hashing one block
at a time gives through the xxhash package's C implementation of XXH64; these
tests hold it to that, and pin the bytes with golden vectors.
"""

from __future__ import annotations

import random

import cbor2
import numpy as np
import pytest
import xxhash

from kvroute.events.hashing import (
    LANE_SEEDS,
    get_hash_fn_by_name,
    hash_fn_name,
    xxh64_tokens,
)
from kvroute.events.kv_events import TokenIds
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher, hash_block_tokens

ROOT = BlockHash(xxh64_tokens("seed"))


def _one_by_one(root: bytes, tokens: tuple[int, ...], block_size: int) -> list[bytes]:
    parent, out = BlockHash(root), []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block_tokens(xxh64_tokens, parent, tokens[start : start + block_size])
        out.append(parent)
    return out


def test_golden_vectors_pin_the_bytes() -> None:
    assert ROOT.hex() == "3a3ed77e5d25b29812bf7dfd1d960f4d"
    assert xxh64_tokens((ROOT, (1, 2, 3, 4), None)).hex() == "8a4df138c615947a84669fdb0cc93dee"
    assert xxh64_tokens((ROOT, (1, 2, 3, 4), ("lora",))).hex() == "8f36c4d511757fdcaef34e540ccfae6b"


def test_a_plain_block_is_two_xxh64_lanes_over_parent_and_token_bytes() -> None:
    tokens = (0, 1, 2**32 - 1, 7)
    data = ROOT + b"".join(t.to_bytes(4, "little") for t in tokens)
    lanes = [xxhash.xxh64_intdigest(data, seed=seed).to_bytes(8, "little") for seed in LANE_SEEDS]
    assert xxh64_tokens((ROOT, tokens, None)) == b"".join(lanes)


@pytest.mark.parametrize("block_size", [2, 4, 16, 64])
@pytest.mark.parametrize("seed", range(3))
def test_the_compiled_chain_equals_hashing_block_by_block(block_size: int, seed: int) -> None:
    rng = random.Random(seed)
    tokens = tuple(rng.randrange(2**32) for _ in range(block_size * 37 + block_size // 2))
    hashes = xxh64_tokens.chain(ROOT, tokens, 0, block_size)
    assert hashes == _one_by_one(ROOT, tokens, block_size)
    assert len(hashes) == 37


def test_the_chain_continues_from_a_start_and_a_parent() -> None:
    tokens = tuple(range(1000, 1000 + 16 * 10))
    whole = _one_by_one(ROOT, tokens, 16)
    assert xxh64_tokens.chain(whole[3], tokens, 4 * 16, 16) == whole[4:]


@pytest.mark.parametrize(
    ("tokens", "block_size", "root"),
    [
        ((1, 2, 3), 3, ROOT),  # odd block size: the kernel reads whole words
        ((1, 2**32, 3, 4), 2, ROOT),  # a token past uint32
        ((1, -1, 3, 4), 2, ROOT),  # a negative token
        ((1, 2, 3, 4), 2, b"short-parent"),  # a parent that is not one of its digests
        ((1,), 2, ROOT),  # no full block
    ],
)
def test_the_chain_declines_what_it_cannot_compile(
    tokens: tuple[int, ...], block_size: int, root: bytes
) -> None:
    assert xxh64_tokens.chain(root, tokens, 0, block_size) is None


@pytest.mark.parametrize("tokens", [(1, 2, 3, 4, 5, 6), (1, 2**40, 3, 4, 5, 6), (9, 8, 7, 6, 5, 4)])
@pytest.mark.parametrize("block_size", [2, 3])
def test_the_request_hasher_gives_the_same_chain_either_way(
    tokens: tuple[int, ...], block_size: int
) -> None:
    hasher = RequestBlockHasher(block_size, xxh64_tokens, ROOT)
    assert hasher.prompt_hashes(PromptKeys(tokens)) == _one_by_one(ROOT, tokens, block_size)


def test_blocks_that_are_not_plain_hash_their_canonical_cbor() -> None:
    value = (ROOT, (1, 2**40), None)
    assert xxh64_tokens(value) == xxhash.xxh3_128_digest(cbor2.dumps(value, canonical=True))
    salted = RequestBlockHasher(2, xxh64_tokens, ROOT).prompt_hashes(
        PromptKeys((1, 2, 3, 4), cache_salt="s")
    )
    plain = xxh64_tokens.chain(ROOT, (1, 2, 3, 4), 0, 2)
    assert salted[0] == xxh64_tokens((ROOT, (1, 2), ("s",)))
    assert salted[0] != plain[0]  # type: ignore[index]
    assert salted[1] == xxh64_tokens((salted[0], (3, 4), None))


def test_it_is_named_in_configs() -> None:
    assert get_hash_fn_by_name("xxh64_tokens") is xxh64_tokens
    assert hash_fn_name(xxh64_tokens) == "xxh64_tokens"


def _reference(parent: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """The chain straight from its definition: each block's digest is XXH64 of the
    parent digest followed by the block's tokens as little-endian uint32, once per
    lane seed, each lane 8 bytes little-endian."""
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = parent + b"".join(
            t.to_bytes(4, "little") for t in tokens[start : start + block_size]
        )
        parent = b"".join(
            xxhash.xxh64_intdigest(data, seed=seed).to_bytes(8, "little") for seed in LANE_SEEDS
        )
        out.append(parent)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_the_chain_equals_the_reference_for_every_form_of_token_ids(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8, 16, 32])
    edges = [0, 1, 2**16, 2**32 - 1]
    tokens = [
        rng.choice([rng.choice(edges), rng.randrange(2**32), rng.randrange(200_000)])
        for _ in range(rng.randrange(1, 40) * block_size + rng.randrange(block_size))
    ]
    start = rng.randrange(len(tokens) // block_size) * block_size
    parent = rng.randbytes(16)
    expected = _reference(parent, tokens[start:], block_size)
    shifted = np.array([0, *tokens], np.uint32)[1:]  # a view 4 bytes off word alignment
    forms = [
        tuple(tokens),
        tokens,
        np.array(tokens, np.uint32),
        shifted,
        TokenIds(np.array(tokens, np.uint32)),
        TokenIds(shifted),
    ]
    for form in forms:
        assert xxh64_tokens.chain(parent, form, start, block_size) == expected
    assert (
        xxh64_tokens((parent, tuple(tokens[:block_size]), None))
        == _reference(parent, tokens[:block_size], block_size)[0]
    )
