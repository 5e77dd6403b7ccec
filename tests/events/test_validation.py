"""Bad payloads: each is rejected with the kind of rule it broke, whatever its encoding."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.kv_events import DEFAULT_LIMITS, DecodeLimits, KVEventDecoder, decode_batch
from tests.events.vectors import GOLDEN_ARRAY


def stored(**changes: Any) -> list[Any]:
    """An array-encoded BlockStored with some fields replaced."""
    fields: dict[str, Any] = {
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": None,
        "group_idx": 0,
        "kv_cache_spec_kind": None,
        "kv_cache_spec_sliding_window": None,
    }
    fields.update(changes)
    return ["BlockStored", *fields.values()]


def batch_of(*events: Any, ts: Any = 1.0, rank: Any = 0) -> bytes:
    return msgspec.msgpack.encode([ts, list(events), rank])


def as_map(array_event: list[Any]) -> dict[str, Any]:
    names = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
    names += ("lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind")
    names += ("kv_cache_spec_sliding_window",)
    return {"type": array_event[0], **dict(zip(names, array_event[1:], strict=True))}


BAD_EVENTS: list[tuple[str, list[Any], MalformedKind]] = [
    ("unknown tag", ["BlockMoved", [1]], MalformedKind.UNKNOWN_TAG),
    ("hash as text", stored(block_hashes=["1"]), MalformedKind.WRONG_TYPE),
    ("token ids as a map", stored(token_ids={"a": 1}), MalformedKind.WRONG_TYPE),
    ("block size as float", stored(block_size=2.5), MalformedKind.WRONG_TYPE),
    ("negative hash", stored(block_hashes=[-1]), MalformedKind.BAD_VALUE),
    ("negative parent hash", stored(parent_block_hash=-5), MalformedKind.BAD_VALUE),
    ("negative token id", stored(token_ids=[1, -2]), MalformedKind.BAD_VALUE),
    ("token id over 32 bits", stored(token_ids=[2**32]), MalformedKind.BAD_VALUE),
    ("zero block size", stored(block_size=0), MalformedKind.BAD_VALUE),
    ("oversized block size", stored(block_size=2**40), MalformedKind.BAD_VALUE),
    ("negative lora id", stored(lora_id=-3), MalformedKind.BAD_VALUE),
    ("oversized group", stored(group_idx=4_096), MalformedKind.BAD_VALUE),
    ("negative window", stored(kv_cache_spec_sliding_window=-1), MalformedKind.BAD_VALUE),
    ("65-byte hash", stored(block_hashes=[b"x" * 65]), MalformedKind.TOO_LARGE),
    ("huge medium name", stored(medium="G" * 4_097), MalformedKind.TOO_LARGE),
]


@pytest.mark.parametrize(("case", "event", "kind"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_a_bad_array_event_is_rejected_with_its_kind(
    case: str, event: list[Any], kind: MalformedKind
) -> None:
    with pytest.raises(MalformedInputError) as info:
        decode_batch(batch_of(stored(), event))
    assert info.value.kind is kind


MAPPABLE = [c for c in BAD_EVENTS if c[1][0] == "BlockStored"]


@pytest.mark.parametrize(("case", "event", "kind"), MAPPABLE, ids=[c[0] for c in MAPPABLE])
def test_a_bad_map_event_is_rejected_with_its_kind(
    case: str, event: list[Any], kind: MalformedKind
) -> None:
    with pytest.raises(MalformedInputError) as info:
        decode_batch(batch_of(as_map(stored()), as_map(event)))
    assert info.value.kind is kind


def test_a_map_event_with_an_unknown_type_is_an_unknown_tag() -> None:
    with pytest.raises(MalformedInputError) as info:
        decode_batch(batch_of({"type": "BlockMoved", "block_hashes": [1]}))
    assert info.value.kind is MalformedKind.UNKNOWN_TAG


@pytest.mark.parametrize(
    ("case", "payload", "kind"),
    [
        ("empty", b"", MalformedKind.NOT_MSGPACK),
        ("invalid opcode", b"\xc1\x00\x01", MalformedKind.NOT_MSGPACK),
        ("truncated", GOLDEN_ARRAY[:-5], MalformedKind.NOT_MSGPACK),
        ("trailing bytes", GOLDEN_ARRAY + b"\x00", MalformedKind.NOT_MSGPACK),
        (
            "text that is not utf-8",
            batch_of(stored(medium="GPU")).replace(b"GPU", b"\x80PU"),
            MalformedKind.NOT_MSGPACK,
        ),
        ("json, whose first byte reads as an int", b'{"ts": 1.0}', MalformedKind.WRONG_TYPE),
        ("batch as a map", msgspec.msgpack.encode({"ts": 1.0}), MalformedKind.WRONG_TYPE),
        ("event as an int", batch_of(5), MalformedKind.WRONG_TYPE),
        ("event with no fields", batch_of([]), MalformedKind.WRONG_TYPE),
        ("negative ts", batch_of(ts=-1.0), MalformedKind.BAD_VALUE),
        ("nan ts", batch_of(ts=float("nan")), MalformedKind.BAD_VALUE),
        ("infinite ts", batch_of(ts=float("inf")), MalformedKind.BAD_VALUE),
        ("ts as text", batch_of(ts="now"), MalformedKind.WRONG_TYPE),
        ("negative rank", batch_of(rank=-1), MalformedKind.BAD_VALUE),
        ("oversized rank", batch_of(rank=2**16), MalformedKind.BAD_VALUE),
        (
            "deep nesting",
            b"\x93\x01\x91" + b"\x91" * 100_000 + b"\xc0\x00",
            MalformedKind.TOO_LARGE,
        ),
    ],
)
def test_a_bad_payload_is_rejected_with_its_kind(
    case: str, payload: bytes, kind: MalformedKind
) -> None:
    with pytest.raises(MalformedInputError) as info:
        decode_batch(payload)
    assert info.value.kind is kind


def test_token_ids_over_the_default_limit_are_too_large() -> None:
    huge = list(range(DEFAULT_LIMITS.max_token_ids + 1))
    with pytest.raises(MalformedInputError) as info:
        decode_batch(batch_of(stored(token_ids=huge)))
    assert info.value.kind is MalformedKind.TOO_LARGE


def test_token_ids_at_the_limit_decode() -> None:
    decoder = KVEventDecoder(DecodeLimits(max_token_ids=3))
    assert decoder.decode(batch_of(stored(token_ids=[1, 2, 3]))).events[0].token_ids == [1, 2, 3]
    with pytest.raises(MalformedInputError) as info:
        decoder.decode(batch_of(stored(token_ids=[1, 2, 3, 4])))
    assert info.value.kind is MalformedKind.TOO_LARGE


@pytest.mark.parametrize(
    ("limits", "payload"),
    [
        (DecodeLimits(max_events=1), batch_of(stored(), stored())),
        (DecodeLimits(max_block_hashes=2), batch_of(stored(block_hashes=[1, 2, 3]))),
        (DecodeLimits(max_block_hashes=1), batch_of(stored(extra_keys=[None, None]))),
    ],
)
def test_lists_over_configured_limits_are_too_large(limits: DecodeLimits, payload: bytes) -> None:
    with pytest.raises(MalformedInputError) as info:
        KVEventDecoder(limits).decode(payload)
    assert info.value.kind is MalformedKind.TOO_LARGE


def test_a_payload_over_the_byte_limit_is_rejected_before_decoding() -> None:
    decoder = KVEventDecoder(DecodeLimits(max_payload_bytes=len(GOLDEN_ARRAY) - 1))
    with pytest.raises(MalformedInputError) as info:
        decoder.decode(GOLDEN_ARRAY)
    assert info.value.kind is MalformedKind.OVERSIZED_PAYLOAD
