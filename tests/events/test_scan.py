"""The compiled frame scan: op arrays that say what the decoded events say, taken
only for payloads the decoder accepts (refusals keep the decoder's verdict), and
events that read, compare, pickle and re-encode like the decoded list."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest

from kvroute.events.errors import MalformedInputError
from kvroute.events.kv_events import (
    DEFAULT_LIMITS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeLimits,
    KVEventBatch,
    KVEventDecoder,
    WireEncoding,
    decode_batch,
    encode_batch,
)
from kvroute.events.scan import (
    CLEARED,
    OP_BLOCK_SIZE,
    OP_GROUP,
    OP_KEYS_END,
    OP_KEYS_START,
    OP_KIND,
    OP_SPEC_END,
    OP_SPEC_START,
    REMOVED,
    STORED,
    ScannedEvents,
    limit_array,
    scan_frame,
)
from kvroute.router.index.ingest import event_hash
from tests.events.test_fuzz import for_generated_payloads

DECODER = KVEventDecoder()
LIMITS = limit_array(DEFAULT_LIMITS)


def scan(payload: bytes, limits: np.ndarray = LIMITS) -> ScannedEvents | None:
    scanned = scan_frame(payload, limits, DECODER.decode_events)
    return None if scanned is None else scanned[1]


def stored(hashes: list[int | bytes], **fields: object) -> BlockStored:
    return BlockStored(hashes, None, [7] * 2 * len(hashes), 2, None, "GPU", None, **fields)  # type: ignore[arg-type]


def agrees(scanned: ScannedEvents, events: list[object]) -> bool:
    """Whether the op rows say what `events` say: kind, group, keys, block size and
    spec kind, event by event."""
    if len(scanned.ops) != len(events):
        return False
    kinds = {BlockStored: STORED, BlockRemoved: REMOVED, AllBlocksCleared: CLEARED}
    for row, event in zip(scanned.ops.tolist(), events, strict=True):
        keys = scanned.keys[row[OP_KEYS_START] : row[OP_KEYS_END]].tolist()
        hashes = getattr(event, "block_hashes", [])
        expected = [h if type(h) is int else event_hash(h) for h in hashes]
        group = getattr(event, "group_idx", None)
        if row[OP_KIND] != kinds[type(event)] or keys != expected:
            return False
        if type(event) is not AllBlocksCleared and row[OP_GROUP] != (
            -1 if group is None else group
        ):
            return False
        if type(event) is BlockStored:
            start, end = row[OP_SPEC_START], row[OP_SPEC_END]
            spec = None if start < 0 else scanned.payload[start:end].decode()
            if row[OP_BLOCK_SIZE] != event.block_size or spec != event.kv_cache_spec_kind:
                return False
    return True


def test_a_scanned_batch_holds_each_events_kind_group_keys_and_spec() -> None:
    events = [
        stored([1, 2**64 - 1, b"\x01" * 32], group_idx=3, kv_cache_spec_kind="full_attention"),
        BlockRemoved([5], "GPU", None),
        AllBlocksCleared(),
        BlockRemoved([b"\x09", 6], None, 0),
        stored([], extra_keys=[], kv_cache_spec_kind=None),
    ]
    payload = encode_batch(KVEventBatch(ts=2.5, events=events, data_parallel_rank=3))
    batch = decode_batch(payload)
    assert type(batch.events) is ScannedEvents
    assert (batch.ts, batch.data_parallel_rank) == (2.5, 3)
    ops = batch.events.ops
    assert ops[:, OP_KIND].tolist() == [STORED, REMOVED, CLEARED, REMOVED, STORED]
    assert ops[:, OP_GROUP].tolist() == [3, -1, -1, 0, -1]
    assert batch.events.keys.tolist() == [1, 2**64 - 1, 0x0101010101010101, 5, 9, 6]
    assert agrees(batch.events, events)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (encode_batch(KVEventBatch(1.0, [BlockRemoved([1], "GPU")]), WireEncoding.MAP), "map"),
        (msgspec.msgpack.encode([1, [["BlockRemoved", [1], None]]]), "an int timestamp"),
        (msgspec.msgpack.encode([1.0, [["BlockRemoved", [b""], None]]]), "an empty hash"),
        (msgspec.msgpack.encode([1.0, [["BlockRemoved", [1], "GPÜ"]]]), "non-ASCII text"),
        (b"\x92\xcb" + b"\x00" * 8 + b"\x91\x93\xd9\x0cBlockRemoved\x91\x01\xc0", "a str8 tag"),
        (b"\x92\xcb" + b"\x00" * 8 + b"\x91\x93\xacBlockRemoved\x91\xd0\x01\xc0", "an int8 hash"),
        (
            encode_batch(KVEventBatch(1.0, [stored([1], extra_keys=[("salt",)])])),
            "extra keys",
        ),
    ],
)
def test_valid_payloads_the_scan_does_not_read_decode_as_before(payload: bytes, why: str) -> None:
    assert scan(payload) is None, why
    batch = decode_batch(payload)
    assert type(batch.events) is list
    assert batch == DECODER.decode_checked(payload)


def test_the_scan_binds_the_decoders_limits() -> None:
    payload = encode_batch(KVEventBatch(1.0, [BlockRemoved([1, 2, 3, 4], "GPU", 9)]))
    assert scan(payload) is not None
    for limits in (DecodeLimits(max_block_hashes=3), DecodeLimits(max_group_idx=8)):
        assert scan(payload, limit_array(limits)) is None
        with pytest.raises(MalformedInputError):
            KVEventDecoder(limits).decode(payload)


def test_scanned_events_read_compare_pickle_and_encode_as_the_list() -> None:
    events = [stored([1, 2], group_idx=0), BlockRemoved([1], "GPU", 0), AllBlocksCleared()]
    built = KVEventBatch(ts=1.0, events=events)
    payload = encode_batch(built)
    batch = decode_batch(payload)
    scanned = batch.events
    assert type(scanned) is ScannedEvents and len(scanned) == 3
    assert batch == built and built == batch and scanned == events and events == scanned
    assert scanned[1] == events[1] and scanned[1:] == events[1:] and list(scanned) == events
    assert pickle.loads(pickle.dumps(batch)) == built
    assert encode_batch(batch) == payload
    assert encode_batch(batch, WireEncoding.MAP) == encode_batch(built, WireEncoding.MAP)
    assert scanned != events[:2]
    with pytest.raises(TypeError):
        hash(scanned)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_scan_accepts_only_what_the_decoder_accepts_and_reads_it_alike() -> None:
    def agree(candidate: bytes) -> None:
        scanned = scan(candidate)
        if scanned is not None:
            assert agrees(scanned, DECODER.decode_events(candidate).events)

    for_generated_payloads(agree, 2_000)
