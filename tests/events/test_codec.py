"""The wire codec: golden bytes both ways, both event encodings, and the struct contract."""

from __future__ import annotations

import msgspec
import pytest

from kvroute.events.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecoder,
    WireEncoding,
    decode_batch,
    encode_batch,
)
from tests.events.vectors import GOLDEN_ARRAY, GOLDEN_MAP, golden_batch


def test_encoding_the_golden_batch_gives_the_golden_array_bytes() -> None:
    assert encode_batch(golden_batch()) == GOLDEN_ARRAY


def test_decoding_the_golden_array_bytes_gives_the_golden_batch() -> None:
    assert decode_batch(GOLDEN_ARRAY) == golden_batch()


def test_decoding_vllm_024_map_encoded_events_gives_the_golden_batch() -> None:
    assert decode_batch(GOLDEN_MAP) == golden_batch()


def test_map_encoding_the_golden_batch_gives_vllm_024_bytes() -> None:
    assert encode_batch(golden_batch(), WireEncoding.MAP) == GOLDEN_MAP


def test_decoded_events_are_the_public_struct_types() -> None:
    for payload in (GOLDEN_ARRAY, GOLDEN_MAP):
        types = [type(event) for event in decode_batch(payload).events]
        assert types == [BlockStored, BlockStored, BlockRemoved, AllBlocksCleared]


def test_a_batch_mixing_array_and_map_events_decodes_each_by_its_own_encoding() -> None:
    array_events = msgspec.msgpack.decode(GOLDEN_ARRAY)[1]
    map_events = msgspec.msgpack.decode(GOLDEN_MAP)[1]
    mixed = [map_events[0], array_events[1], map_events[2], array_events[3]]
    payload = msgspec.msgpack.encode([1700000000.5, mixed, 0])
    assert decode_batch(payload) == golden_batch()


def test_array_events_with_missing_trailing_defaults_decode_with_the_defaults() -> None:
    # vLLM before group tags sent BlockStored with 7 fields and BlockRemoved with 2.
    payload = msgspec.msgpack.encode(
        [
            2.0,
            [["BlockStored", [5], None, [1, 2], 2, None, "GPU", None], ["BlockRemoved", [5], None]],
        ]
    )
    assert decode_batch(payload) == KVEventBatch(
        ts=2.0,
        events=[
            BlockStored([5], None, [1, 2], 2, None, "GPU", None),
            BlockRemoved([5], None),
        ],
        data_parallel_rank=None,
    )


def test_extra_trailing_array_fields_and_unknown_map_keys_are_ignored() -> None:
    payload = msgspec.msgpack.encode(
        [
            3.0,
            [
                ["BlockRemoved", [9], "GPU", 2, "a-future-field"],
                {"type": "BlockRemoved", "block_hashes": [9], "medium": "GPU", "locality": 1},
            ],
            1,
        ]
    )
    assert decode_batch(payload).events == [
        BlockRemoved([9], "GPU", 2),
        BlockRemoved([9], "GPU", None),
    ]


def test_raw_byte_hashes_round_trip() -> None:
    batch = KVEventBatch(
        ts=4.0,
        events=[BlockStored([b"\x01" * 32], b"\x02" * 32, [7], 1, 3, "GPU", "adapter")],
    )
    for encoding in WireEncoding:
        assert decode_batch(encode_batch(batch, encoding)) == batch


def test_the_largest_unsigned_64_bit_hash_decodes() -> None:
    batch = KVEventBatch(ts=0.0, events=[BlockRemoved([2**64 - 1], "GPU")], data_parallel_rank=0)
    assert decode_batch(encode_batch(batch)) == batch


def test_decoder_accepts_memoryview_payloads() -> None:
    assert KVEventDecoder().decode(memoryview(GOLDEN_ARRAY)) == golden_batch()


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (
            BlockStored,
            (
                "block_hashes",
                "parent_block_hash",
                "token_ids",
                "block_size",
                "lora_id",
                "medium",
                "lora_name",
                "extra_keys",
                "group_idx",
                "kv_cache_spec_kind",
                "kv_cache_spec_sliding_window",
            ),
        ),
        (BlockRemoved, ("block_hashes", "medium", "group_idx")),
        (AllBlocksCleared, ()),
        (KVEventBatch, ("ts", "events", "data_parallel_rank")),
    ],
)
def test_struct_field_order_is_the_seeds(
    cls: type[msgspec.Struct], fields: tuple[str, ...]
) -> None:
    assert cls.__struct_fields__ == fields
