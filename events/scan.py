"""A compiled scan of an array-encoded `KVEventBatch` payload into op arrays.

The router's ingest needs, per event, only its kind, group, block keys, block size
and cache spec kind; building a Python object per event (nearly all of them
single-block BlockRemoved) costs more than applying it. `scan_frame` reads those
straight from the msgpack bytes in one compiled pass, and checks on the way
everything the checked decoder checks, so a payload it accepts is one the decoder
accepts too. It refuses (returns None) anything it does not read exactly as the
decoder would: the map encoding, an encoding msgspec accepts but our publishers and
vLLM never write (a signed int, a str8 tag, an int timestamp), non-ASCII text,
extra keys other than None, an empty bytes hash, and every malformed payload; the
caller then decodes the payload the usual way, which gives the verdict.

The ops come in stream order, one row per event: `OP_*` columns below.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np
from numba import njit

if TYPE_CHECKING:
    from kvroute.events.kv_events import DecodeLimits, KVCacheEventType

# Event kinds in OP_KIND.
STORED, REMOVED, CLEARED = 0, 1, 2
# Columns of an op row: kind, group_idx (-1: None), the event's keys as
# keys[OP_KEYS_START:OP_KEYS_END], and for BlockStored its block size and the
# byte range of its kv_cache_spec_kind in the payload (start -1: None).
OP_KIND, OP_GROUP, OP_KEYS_START, OP_KEYS_END, OP_BLOCK_SIZE, OP_SPEC_START, OP_SPEC_END = range(7)
OP_COLUMNS = 7
# The limits the scan checks, in this order (an int64 array).
_LIMIT_NAMES = (
    "max_events",
    "max_block_hashes",
    "max_token_ids",
    "max_token_id",
    "max_block_size",
    "max_hash_bytes",
    "max_group_idx",
    "max_sliding_window",
    "max_data_parallel_rank",
    "max_str_len",
)
_MAX_EVENTS, _MAX_HASHES, _MAX_TOKENS, _MAX_TOKEN, _MAX_BLOCK_SIZE, _MAX_HASH_BYTES = range(6)
_MAX_GROUP, _MAX_WINDOW, _MAX_DP_RANK, _MAX_STR = range(6, 10)
_NIL = 0xC0
_FLOAT_MAX = sys.float_info.max
_INT63_MAX = 2**63 - 1
# The event tags as fixstr bytes.
_TAG_STORED = np.frombuffer(b"BlockStored", np.uint8)
_TAG_REMOVED = np.frombuffer(b"BlockRemoved", np.uint8)
_TAG_CLEARED = np.frombuffer(b"AllBlocksCleared", np.uint8)
# Bytes taken by a uint32-range unsigned int, by its head byte (0: read it whole).
_TOKEN_STEP = np.zeros(256, np.int64)
_TOKEN_STEP[:0x80] = 1
_TOKEN_STEP[0xCC], _TOKEN_STEP[0xCD], _TOKEN_STEP[0xCE] = 2, 3, 5


def limit_array(limits: DecodeLimits) -> np.ndarray:
    """The limits as `scan_frame` reads them; uint64-sized ones are capped, which
    only makes the scan refuse values the decoder might accept."""
    return np.array([min(getattr(limits, n), _INT63_MAX) for n in _LIMIT_NAMES], np.int64)


@njit(cache=True, inline="always")
def _be(buf: np.ndarray, pos: int, width: int) -> np.uint64:
    value = np.uint64(0)
    for i in range(width):
        value = (value << np.uint64(8)) | np.uint64(buf[pos + i])
    return value


@njit(cache=True, inline="always")
def _be_fixed(buf: np.ndarray, pos: int, width: int) -> np.uint64:
    """`_be` for a width of 1, 2, 4 or 8, each spelled out (the loop does not unroll)."""
    if width == 8:
        return (
            (np.uint64(buf[pos]) << np.uint64(56))
            | (np.uint64(buf[pos + 1]) << np.uint64(48))
            | (np.uint64(buf[pos + 2]) << np.uint64(40))
            | (np.uint64(buf[pos + 3]) << np.uint64(32))
            | (np.uint64(buf[pos + 4]) << np.uint64(24))
            | (np.uint64(buf[pos + 5]) << np.uint64(16))
            | (np.uint64(buf[pos + 6]) << np.uint64(8))
            | np.uint64(buf[pos + 7])
        )
    if width == 4:
        return (
            (np.uint64(buf[pos]) << np.uint64(24))
            | (np.uint64(buf[pos + 1]) << np.uint64(16))
            | (np.uint64(buf[pos + 2]) << np.uint64(8))
            | np.uint64(buf[pos + 3])
        )
    if width == 2:
        return (np.uint64(buf[pos]) << np.uint64(8)) | np.uint64(buf[pos + 1])
    return np.uint64(buf[pos])


@njit(cache=True, inline="always")
def _uint(buf: np.ndarray, pos: int) -> tuple[int, np.uint64]:
    """An unsigned int at `pos`: (the position after it, its value), or (-1, 0)."""
    size = buf.size
    if pos >= size:
        return -1, np.uint64(0)
    head = buf[pos]
    if head <= 0x7F:
        return pos + 1, np.uint64(head)
    if 0xCC <= head <= 0xCF:
        width = 1 << (np.int64(head) - 0xCC)
        if pos + 1 + width > size:
            return -1, np.uint64(0)
        return pos + 1 + width, _be_fixed(buf, pos + 1, width)
    return -1, np.uint64(0)


@njit(cache=True, inline="always")
def _bounded(buf: np.ndarray, pos: int, limit: int, nullable: bool) -> tuple[int, int]:
    """An unsigned int at most `limit` (or nil, as -1, when `nullable`):
    (the position after it, its value), or (-1, 0)."""
    if nullable and pos < buf.size and buf[pos] == _NIL:
        return pos + 1, -1
    after, value = _uint(buf, pos)
    if after < 0 or value > np.uint64(limit):
        return -1, 0
    return after, np.int64(value)


@njit(cache=True, inline="always")
def _array(buf: np.ndarray, pos: int) -> tuple[int, int]:
    """An array header at `pos`: (the position of its first item, its length), or (-1, 0)."""
    size = buf.size
    if pos >= size:
        return -1, 0
    head = buf[pos]
    if 0x90 <= head <= 0x9F:
        return pos + 1, np.int64(head) - 0x90
    if head == 0xDC and pos + 3 <= size:
        return pos + 3, np.int64(_be(buf, pos + 1, 2))
    if head == 0xDD and pos + 5 <= size:
        return pos + 5, np.int64(_be(buf, pos + 1, 4))
    return -1, 0


@njit(cache=True, inline="always")
def _text(buf: np.ndarray, pos: int, max_len: int) -> tuple[int, int]:
    """nil or an ASCII str of at most `max_len` characters: (the position after it,
    where its bytes start, or -1 for nil), or (-1, 0)."""
    size = buf.size
    if pos >= size:
        return -1, 0
    head = buf[pos]
    if head == _NIL:
        return pos + 1, -1
    if 0xA0 <= head <= 0xBF:
        length, start = np.int64(head) - 0xA0, pos + 1
    elif head == 0xD9 and pos + 2 <= size:
        length, start = np.int64(buf[pos + 1]), pos + 2
    elif head == 0xDA and pos + 3 <= size:
        length, start = np.int64(_be(buf, pos + 1, 2)), pos + 3
    else:
        return -1, 0
    if length > max_len or start + length > size:
        return -1, 0
    for i in range(start, start + length):
        if buf[i] >= 0x80:
            return -1, 0
    return start + length, start


@njit(cache=True, inline="always")
def _tag_is(buf: np.ndarray, pos: int, tag: np.ndarray) -> bool:
    """Whether the fixstr at `pos` is `tag`."""
    if pos + 1 + tag.size > buf.size or buf[pos] != 0xA0 + tag.size:
        return False
    same = True
    for i in range(tag.size):
        same &= buf[pos + 1 + i] == tag[i]
    return same


@njit(cache=True, inline="always")
def _hash_key(buf: np.ndarray, pos: int, max_bytes: int) -> tuple[int, np.uint64]:
    """A block hash (an unsigned int, or 1 to `max_bytes` raw bytes, keyed by their
    last 8 big-endian) or nil: (the position after it, its key), or (-1, 0)."""
    size = buf.size
    if pos < size and buf[pos] == 0xC4:
        if pos + 2 > size:
            return -1, np.uint64(0)
        length = np.int64(buf[pos + 1])
        start = pos + 2
        if length == 0 or length > max_bytes or start + length > size:
            return -1, np.uint64(0)
        tail = min(length, 8)
        return start + length, _be(buf, start + length - tail, tail)
    return _uint(buf, pos)


@njit(cache=True, inline="always")
def _hashes(buf: np.ndarray, pos: int, count: int, max_bytes: int, keys: np.ndarray) -> int:
    """`count` block hashes from `pos` into `keys`: the position after them, or -1."""
    for i in range(count):
        pos, key = _hash_key(buf, pos, max_bytes)
        if pos < 0:
            return -1
        keys[i] = key
    return pos


@njit(cache=True)
def _grown(keys: np.ndarray, filled: int, need: int) -> np.ndarray:
    """`keys` with room for `need` more after its first `filled`."""
    grown = np.empty(max(2 * keys.size, filled + need), np.uint64)
    grown[:filled] = keys[:filled]
    return grown


@njit(cache=True, inline="always")
def _event_hashes(
    buf: np.ndarray, pos: int, limits: np.ndarray, keys: np.ndarray, filled: int, op: np.ndarray
) -> tuple[int, np.ndarray, int]:
    """An event's `block_hashes` array from `pos`, appended to `keys` after its first
    `filled` (grown if need be), its range noted in `op`: (position after it, keys,
    filled), the position -1 if it is not within the limits."""
    pos, count = _array(buf, pos)
    if pos < 0 or count > limits[_MAX_HASHES] or count > buf.size:
        return -1, keys, filled
    if filled + count > keys.size:
        keys = _grown(keys, filled, count)
    pos = _hashes(buf, pos, count, limits[_MAX_HASH_BYTES], keys[filled:])
    if pos < 0:
        return -1, keys, filled
    op[OP_KEYS_START] = filled
    op[OP_KEYS_END] = filled + count
    return pos, keys, filled + count


@njit(cache=True, inline="always")
def _tokens(buf: np.ndarray, pos: int, max_count: int, max_token: int) -> int:
    """An array of unsigned token ids within the limits: the position after it, or -1."""
    pos, count = _array(buf, pos)
    if pos < 0 or count > max_count or count > buf.size:
        return -1
    # Token ids are most of a stream's bytes. With the default bound (the uint32
    # range) only a uint64 needs its value read: the others are stepped over by
    # their head byte alone.
    limit = np.uint64(max_token)
    size = buf.size
    if limit >= np.uint64(0xFFFFFFFF):
        for _ in range(count):
            if pos >= size:
                return -1
            step = _TOKEN_STEP[buf[pos]]
            if step == 0:
                pos, value = _uint(buf, pos)
                if pos < 0 or value > limit:
                    return -1
            else:
                pos += step
        return pos if pos <= size else -1
    for _ in range(count):
        pos, value = _uint(buf, pos)
        if pos < 0 or value > limit:
            return -1
    return pos


@njit(cache=True)
def _scan(buf: np.ndarray, limits: np.ndarray) -> tuple[bool, float, int, np.ndarray, np.ndarray]:
    """(accepted, ts, data_parallel_rank or -1, ops, keys); see the module doc."""
    empty_ops = np.empty((0, OP_COLUMNS), np.int64)
    empty_keys = np.empty(0, np.uint64)
    size = buf.size
    pos, fields = _array(buf, 0)
    if pos < 0 or not 2 <= fields <= 3 or pos + 9 > size or buf[pos] != 0xCB:
        return False, 0.0, -1, empty_ops, empty_keys
    ts = np.array([_be_fixed(buf, pos + 1, 8)], np.uint64).view(np.float64)[0]
    if not 0.0 <= ts <= _FLOAT_MAX:
        return False, 0.0, -1, empty_ops, empty_keys
    pos, count = _array(buf, pos + 9)
    if pos < 0 or count > limits[_MAX_EVENTS] or count > size:
        return False, 0.0, -1, empty_ops, empty_keys
    ops = np.empty((count, OP_COLUMNS), np.int64)
    keys = np.empty(max(16, 2 * count), np.uint64)
    filled = 0
    max_str = limits[_MAX_STR]
    for e in range(count):
        pos, items = _array(buf, pos)
        if pos < 0 or items < 1:
            return False, 0.0, -1, empty_ops, empty_keys
        ops[e, OP_GROUP] = -1
        ops[e, OP_BLOCK_SIZE] = 0
        ops[e, OP_SPEC_START] = -1
        ops[e, OP_SPEC_END] = -1
        if _tag_is(buf, pos, _TAG_REMOVED):
            if not 3 <= items <= 4:
                return False, 0.0, -1, empty_ops, empty_keys
            ops[e, OP_KIND] = REMOVED
            pos, keys, filled = _event_hashes(
                buf, pos + 1 + _TAG_REMOVED.size, limits, keys, filled, ops[e]
            )
            if pos < 0:
                return False, 0.0, -1, empty_ops, empty_keys
            pos, _ = _text(buf, pos, max_str)  # medium
            if pos >= 0 and items == 4:
                pos, group = _bounded(buf, pos, limits[_MAX_GROUP], True)
                ops[e, OP_GROUP] = group
        elif _tag_is(buf, pos, _TAG_STORED):
            if not 8 <= items <= 12:
                return False, 0.0, -1, empty_ops, empty_keys
            ops[e, OP_KIND] = STORED
            pos, keys, filled = _event_hashes(
                buf, pos + 1 + _TAG_STORED.size, limits, keys, filled, ops[e]
            )
            if pos < 0:
                return False, 0.0, -1, empty_ops, empty_keys
            if pos < size and buf[pos] == _NIL:  # parent_block_hash
                pos += 1
            else:
                pos, _ = _hash_key(buf, pos, limits[_MAX_HASH_BYTES])
            if pos >= 0:
                pos = _tokens(buf, pos, limits[_MAX_TOKENS], limits[_MAX_TOKEN])
            if pos >= 0:
                pos, block_size = _bounded(buf, pos, limits[_MAX_BLOCK_SIZE], False)
                ops[e, OP_BLOCK_SIZE] = block_size
                if block_size < 1:
                    pos = -1
            if pos >= 0:
                pos, _ = _bounded(buf, pos, _INT63_MAX, True)  # lora_id
            if pos >= 0:
                pos, _ = _text(buf, pos, max_str)  # medium
            if pos >= 0:
                pos, _ = _text(buf, pos, max_str)  # lora_name
            if pos >= 0 and items >= 9:  # extra_keys: None, or a None per block
                if pos < size and buf[pos] == _NIL:
                    pos += 1
                else:
                    pos, extras = _array(buf, pos)
                    if pos < 0 or extras > limits[_MAX_HASHES] or pos + extras > size:
                        return False, 0.0, -1, empty_ops, empty_keys
                    for i in range(pos, pos + extras):
                        if buf[i] != _NIL:
                            return False, 0.0, -1, empty_ops, empty_keys
                    pos += extras
            if pos >= 0 and items >= 10:
                pos, group = _bounded(buf, pos, limits[_MAX_GROUP], True)
                ops[e, OP_GROUP] = group
            if pos >= 0 and items >= 11:
                after, start = _text(buf, pos, max_str)
                if after >= 0 and start >= 0:
                    ops[e, OP_SPEC_START], ops[e, OP_SPEC_END] = start, after
                pos = after
            if pos >= 0 and items >= 12:
                pos, _ = _bounded(buf, pos, limits[_MAX_WINDOW], True)
        elif _tag_is(buf, pos, _TAG_CLEARED):
            if items != 1:
                return False, 0.0, -1, empty_ops, empty_keys
            ops[e, OP_KIND] = CLEARED
            ops[e, OP_KEYS_START] = ops[e, OP_KEYS_END] = filled
            pos += 1 + _TAG_CLEARED.size
        else:
            return False, 0.0, -1, empty_ops, empty_keys
        if pos < 0:
            return False, 0.0, -1, empty_ops, empty_keys
    rank = -1
    if fields == 3:
        pos, rank = _bounded(buf, pos, limits[_MAX_DP_RANK], True)
    if pos != size:
        return False, 0.0, -1, empty_ops, empty_keys
    return True, ts, rank, ops, keys[:filled]


class ScannedEvents(Sequence["KVCacheEventType"]):
    """A scanned batch's events: its op arrays, for ingest to apply without a Python
    step per event, and the events themselves, decoded from the payload the first
    time anything reads them (once; the scan guarantees the decode succeeds). Reads,
    compares, pickles and re-encodes as that list."""

    __slots__ = ("_decode", "_events", "buffer", "keys", "ops", "payload")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self, payload: bytes, buffer: np.ndarray, ops: np.ndarray, keys: np.ndarray, decode: Any
    ) -> None:
        self.payload = payload
        self.buffer = buffer
        self.ops = ops
        self.keys = keys
        self._decode = decode
        self._events: list[KVCacheEventType] | None = None

    @property
    def events(self) -> list[KVCacheEventType]:
        """The decoded events (decoded on first use)."""
        events = self._events
        if events is None:
            events = self._events = self._decode(self.payload).events
        return events

    def __len__(self) -> int:
        return len(self.ops)

    @overload
    def __getitem__(self, index: int) -> KVCacheEventType: ...
    @overload
    def __getitem__(self, index: slice) -> list[KVCacheEventType]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return self.events[index]

    def __iter__(self) -> Iterator[KVCacheEventType]:
        return iter(self.events)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ScannedEvents):
            return self.events == other.events
        if isinstance(other, list):
            return self.events == other
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self.events)

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (self.events,)


def scan_frame(
    payload: bytes, limits: np.ndarray, decode: Any
) -> tuple[float, ScannedEvents, int | None] | None:
    """(ts, events, data_parallel_rank) of an array-encoded batch payload, or None
    where the scan refuses it (see the module doc); `decode` decodes the events
    when they are first read."""
    buffer = np.frombuffer(payload, np.uint8)
    accepted, ts, rank, ops, keys = _scan(buffer, limits)
    if not accepted:
        return None
    return ts, ScannedEvents(payload, buffer, ops, keys, decode), (None if rank < 0 else rank)
