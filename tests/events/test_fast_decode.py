"""The decoder's fast path (removals straight into BlockRemoved, token ids scanned
into a uint32 `TokenIds`) gives exactly what the checked path gives: the same
batch, or the same rejection with the same kind."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest

from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.kv_events import (
    DEFAULT_LIMITS,
    BlockRemoved,
    BlockStored,
    DecodeLimits,
    KVEventBatch,
    KVEventDecoder,
    TokenIds,
    WireEncoding,
    decode_batch,
    encode_batch,
)
from tests.events.test_fuzz import for_generated_payloads
from tests.events.vectors import GOLDEN_ARRAY, GOLDEN_MAP


def stored_event(token_ids: object) -> list[object]:
    """An array-encoded BlockStored whose token ids are `token_ids` (Raw: as given)."""
    return ["BlockStored", [1], None, token_ids, 2, None, "GPU", None, None, 0, None, None]


def payload_of(*events: object) -> bytes:
    return msgspec.msgpack.encode([1.0, list(events), 0])


def outcome(decode: object, payload: bytes) -> object:
    """The decoded batch, or the kind it was rejected with."""
    try:
        return decode(payload)  # type: ignore[operator]
    except MalformedInputError as exc:
        return exc.kind


def checked(payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> object:
    """The checked path's outcome alone."""
    return outcome(KVEventDecoder(limits).decode_checked, payload)


def test_decoded_token_ids_read_and_compare_like_the_list() -> None:
    tokens = [0, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1]
    event = decode_batch(payload_of(stored_event(tokens))).events[0]
    ids = event.token_ids
    assert type(ids) is TokenIds and ids.array.dtype == np.uint32
    assert ids == tokens and tokens == ids and ids != tokens[:-1]
    assert ids != tuple(tokens)  # as a list is never equal to a tuple
    assert len(ids) == 8 and ids[2] == 128 and ids[-1] == 2**32 - 1 and ids[1:3] == [127, 128]
    assert list(ids) == tokens and ids.tolist() == tokens and repr(ids) == repr(tokens)
    with pytest.raises(TypeError):
        hash(ids)


def test_a_decoded_event_with_token_ids_pickles_and_hashes_like_the_built_one() -> None:
    built = KVEventBatch(1.0, [BlockStored([1], None, [5, 6], 2, None, "GPU", None)])
    decoded = decode_batch(encode_batch(built))
    assert pickle.loads(pickle.dumps(decoded)) == built
    assert hash(decoded.events[0]) == hash(built.events[0])


@pytest.mark.parametrize("encoding", list(WireEncoding))
def test_a_decoded_golden_batch_re_encodes_to_the_golden_bytes(encoding: WireEncoding) -> None:
    golden = GOLDEN_ARRAY if encoding is WireEncoding.ARRAY else GOLDEN_MAP
    for payload in (GOLDEN_ARRAY, GOLDEN_MAP):
        assert encode_batch(decode_batch(payload), encoding) == golden


def test_removals_decode_into_the_public_struct_and_custom_limits_still_bind() -> None:
    payload = payload_of(["BlockRemoved", [1, 2, 3, 4], "GPU", 0])
    assert type(decode_batch(payload).events[0]) is BlockRemoved
    with pytest.raises(MalformedInputError) as info:
        KVEventDecoder(DecodeLimits(max_block_hashes=3)).decode(payload)
    assert info.value.kind is MalformedKind.TOO_LARGE
    narrow = KVEventDecoder(DecodeLimits(max_block_hashes=4)).decode(payload)
    assert narrow.events == [BlockRemoved([1, 2, 3, 4], "GPU", 0)]


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        (b"\x92\xd0\x05\xd1\x01\x00", [5, 256]),  # positive values in signed encodings
        (b"\xdc\x00\x02\x01\x02", [1, 2]),  # array16 header
        (b"\xdd\x00\x00\x00\x02\xcf\x00\x00\x00\x00\x00\x00\x00\x07\x03", [7, 3]),  # uint64
        (b"\x90", []),
    ],
)
def test_unusual_but_valid_token_encodings_decode_to_their_values(
    raw: bytes, tokens: list[int]
) -> None:
    payload = payload_of(stored_event(msgspec.Raw(raw)))
    assert decode_batch(payload).events[0].token_ids == tokens
    assert checked(payload) == decode_batch(payload)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\x92\x01\xff", MalformedKind.BAD_VALUE),  # negative fixint
        (b"\x91\xce\xff\xff\xff\xff", None),  # 2**32 - 1: the largest token
        (b"\x91\xcf\x00\x00\x00\x01\x00\x00\x00\x00", MalformedKind.BAD_VALUE),  # 2**32
        (b"\x92\x01\xa1x", MalformedKind.WRONG_TYPE),  # a string
        (b"\x91\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", MalformedKind.WRONG_TYPE),  # 1.0
        (b"\x81\x01\x02", MalformedKind.WRONG_TYPE),  # a map
    ],
)
def test_each_token_fault_is_rejected_with_the_checked_paths_kind(
    raw: bytes, kind: MalformedKind | None
) -> None:
    payload = payload_of(stored_event(msgspec.Raw(raw)))
    result = outcome(decode_batch, payload)
    assert result == checked(payload)
    assert (result if kind is not None else None) == kind


def test_token_ids_past_32_bits_under_wider_limits_decode_as_ints() -> None:
    limits = DecodeLimits(max_token_id=2**40)
    payload = payload_of(stored_event([1, 2**33]))
    assert KVEventDecoder(limits).decode(payload).events[0].token_ids == [1, 2**33]
    over = payload_of(stored_event([1, 2**41]))
    with pytest.raises(MalformedInputError) as info:
        KVEventDecoder(limits).decode(over)
    assert info.value.kind is MalformedKind.BAD_VALUE


def test_more_token_ids_than_the_limit_are_too_large_on_both_paths() -> None:
    limits = DecodeLimits(max_token_ids=3)
    payload = payload_of(stored_event([1, 2, 3, 4]))
    assert outcome(KVEventDecoder(limits).decode, payload) is MalformedKind.TOO_LARGE
    assert checked(payload, limits) is MalformedKind.TOO_LARGE


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fast_and_checked_paths_agree_on_generated_payloads() -> None:
    def agree(candidate: bytes) -> None:
        assert outcome(decode_batch, candidate) == checked(candidate)

    for_generated_payloads(agree, 2_000)
