"""Fuzzing the decoder: any bytes either decode to a batch within limits or raise
MalformedInputError, and a batch that decodes re-encodes to bytes that decode to it."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.events.errors import MalformedInputError
from kvroute.events.kv_events import (
    DEFAULT_LIMITS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    WireEncoding,
    decode_batch,
    encode_batch,
)
from tests.events.vectors import GOLDEN_ARRAY, GOLDEN_MAP

# Hypothesis costs about 0.3 ms per example here, so each example is checked together
# with DERIVED mutations of itself: 10,000 examples give 100,000 decoded inputs in ~20 s.
EXAMPLES = 10_000
DERIVED = 9
INPUTS = EXAMPLES * (1 + DERIVED)

# Values of every msgpack type, weighted towards the edges of the checked ranges.
INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([-1, 0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=66),
)
FIELDS = st.one_of(
    SCALARS,
    st.lists(st.one_of(INTS, st.binary(max_size=66)), max_size=4),
    st.lists(st.one_of(st.none(), st.tuples(st.text(max_size=3), INTS)), max_size=2),
)
TAGS = st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "BlockMoved", ""])
FIELD_NAMES = st.sampled_from(
    [f.name for f in msgspec.structs.fields(BlockStored)] + ["type", "locality"]
)
ARRAY_EVENTS = st.builds(lambda tag, fields: [tag, *fields], TAGS, st.lists(FIELDS, max_size=12))
MAP_EVENTS = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    TAGS,
    st.dictionaries(FIELD_NAMES, FIELDS, max_size=11),
)
SHAPED_BATCHES = st.builds(
    lambda ts, events, rank: msgspec.msgpack.encode([ts, events, rank]),
    st.one_of(st.floats(), INTS, SCALARS),
    st.lists(st.one_of(ARRAY_EVENTS, MAP_EVENTS, SCALARS), max_size=3),
    st.one_of(st.none(), INTS, SCALARS),
)
HASHES = st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=64))
OPTIONAL_TEXT = st.one_of(st.none(), st.text(max_size=8))
VALID_EVENTS = st.one_of(
    st.builds(
        BlockStored,
        block_hashes=st.lists(HASHES, max_size=3),
        parent_block_hash=st.one_of(st.none(), HASHES),
        token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=8),
        block_size=st.integers(1, 2**20),
        lora_id=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        medium=OPTIONAL_TEXT,
        lora_name=OPTIONAL_TEXT,
        extra_keys=st.one_of(st.none(), st.lists(st.none() | st.tuples(st.text(max_size=3)))),
        group_idx=st.one_of(st.none(), st.integers(0, 4_095)),
        kv_cache_spec_kind=OPTIONAL_TEXT,
        kv_cache_spec_sliding_window=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
    ),
    st.builds(BlockRemoved, st.lists(HASHES, max_size=3), OPTIONAL_TEXT),
    st.just(AllBlocksCleared()),
)
VALID_BATCHES = st.builds(
    encode_batch,
    st.builds(
        KVEventBatch,
        ts=st.floats(0, 2e9),
        events=st.lists(VALID_EVENTS, max_size=3),
        data_parallel_rank=st.one_of(st.none(), st.integers(0, 65_535)),
    ),
    st.sampled_from(WireEncoding),
)
PAYLOADS = st.one_of(
    st.binary(max_size=256),
    st.sampled_from([GOLDEN_ARRAY, GOLDEN_MAP]),
    SHAPED_BATCHES,
    VALID_BATCHES,
)


def mutate(payload: bytes, rng: random.Random) -> bytes:
    """`payload` with a few bytes changed, inserted or cut off."""
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        action = rng.choice(("set", "insert", "truncate"))
        if action == "set" and at < len(data):
            data[at] = rng.randrange(256)
        elif action == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 4))
        else:
            del data[at:]
    return bytes(data)


def for_generated_payloads(
    check: Callable[[bytes], object], examples: int, derived: int = 4
) -> None:
    """`check` each of `examples` generated payloads and `derived` mutations of each."""

    @settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(PAYLOADS, st.integers(0, 2**32))
    def run(payload: bytes, seed: int) -> None:
        rng = random.Random(seed)
        for candidate in [payload] + [mutate(payload, rng) for _ in range(derived)]:
            check(candidate)

    run()


def assert_within_limits(batch: KVEventBatch) -> None:
    limits = DEFAULT_LIMITS
    assert math.isfinite(batch.ts) and batch.ts >= 0
    assert batch.data_parallel_rank is None or batch.data_parallel_rank >= 0
    for event in batch.events:
        if isinstance(event, BlockStored | BlockRemoved):
            for block_hash in event.block_hashes:
                assert (isinstance(block_hash, int) and 0 <= block_hash < 2**64) or (
                    isinstance(block_hash, bytes) and len(block_hash) <= limits.max_hash_bytes
                )
        if isinstance(event, BlockStored):
            assert all(0 <= token <= limits.max_token_id for token in event.token_ids)
            assert 1 <= event.block_size <= limits.max_block_size


def check(payload: bytes) -> bool:
    """The fuzz property; True if `payload` decoded."""
    try:
        batch = decode_batch(payload)
    except MalformedInputError:
        return False
    assert_within_limits(batch)
    for encoding in WireEncoding:
        assert decode_batch(encode_batch(batch, encoding)) == batch
    return True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_decoder_survives_a_hundred_thousand_generated_payloads() -> None:
    outcomes = {True: 0, False: 0}

    def count(candidate: bytes) -> None:
        outcomes[check(candidate)] += 1

    for_generated_payloads(count, EXAMPLES, DERIVED)
    assert sum(outcomes.values()) >= INPUTS >= 100_000
    assert outcomes[True] > 0 and outcomes[False] > 0, outcomes
