"""The wire contract between replicas and the router: vLLM's KV cache event structs.

Field order, tags and encoding are vLLM's at the seed's commit (array-encoded
msgspec structs, tagged by class name), so a real vLLM engine and our replicas
produce the same bytes. Every other module imports these names and never builds
frames by hand.
"""

from __future__ import annotations

import enum
import functools
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, Union, overload

import msgspec
import numpy as np
from msgspec import Meta
from msgspec.structs import astuple
from numba import njit

from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.scan import ScannedEvents, limit_array, scan_frame

MEDIUM_GPU = "GPU"

# A block hash as it travels in events: the low 64 bits of the engine's hash as
# an unsigned int (the default), or the raw hash bytes when int hashes are off.
ExternalBlockHash = bytes | int


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds a decoded batch must respect; anything outside is malformed input.

    Hashes are unsigned 64-bit ints (msgpack cannot carry more) or at most
    `max_hash_bytes` raw bytes. Counts are per event except `max_events`.
    """

    max_payload_bytes: int = 64 * 2**20
    max_events: int = 65_536
    max_block_hashes: int = 131_072
    max_token_ids: int = 2_097_152
    max_token_id: int = 2**32 - 1
    max_block_size: int = 2**20
    max_hash_bytes: int = 64
    max_group_idx: int = 4_095
    max_sliding_window: int = 2**31 - 1
    max_data_parallel_rank: int = 65_535
    max_str_len: int = 4_096


DEFAULT_LIMITS = DecodeLimits()


def _field_types(limits: DecodeLimits) -> dict[str, Any]:
    """The checked type of every wire field, keyed by field name."""
    block_hash = (
        Annotated[int, Meta(ge=0)] | Annotated[bytes, Meta(max_length=limits.max_hash_bytes)]
    )
    text = Annotated[str, Meta(max_length=limits.max_str_len)]
    token = Annotated[int, Meta(ge=0, le=limits.max_token_id)]
    return {
        "ts": Annotated[float, Meta(ge=0.0, le=sys.float_info.max)],  # rejects nan and inf
        "data_parallel_rank": Annotated[int, Meta(ge=0, le=limits.max_data_parallel_rank)] | None,
        "block_hashes": Annotated[list[block_hash], Meta(max_length=limits.max_block_hashes)],
        "parent_block_hash": block_hash | None,
        "token_ids": Annotated[list[token], Meta(max_length=limits.max_token_ids)],
        "block_size": Annotated[int, Meta(ge=1, le=limits.max_block_size)],
        "lora_id": Annotated[int, Meta(ge=0, le=2**63 - 1)] | None,
        "medium": text | None,
        "lora_name": text | None,
        "extra_keys": Annotated[
            list[tuple[Any, ...] | None], Meta(max_length=limits.max_block_hashes)
        ]
        | None,
        "group_idx": Annotated[int, Meta(ge=0, le=limits.max_group_idx)] | None,
        "kv_cache_spec_kind": text | None,
        "kv_cache_spec_sliding_window": (
            Annotated[int, Meta(ge=0, le=limits.max_sliding_window)] | None
        ),
    }


_DEFAULT_TYPES = _field_types(DEFAULT_LIMITS)
# BlockRemoved's fields as the default limits check them (see the class).
_RemovedHashes = _DEFAULT_TYPES["block_hashes"]
_Medium = _DEFAULT_TYPES["medium"]
_Group = _DEFAULT_TYPES["group_idx"]


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A timestamped batch of events from one engine step."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class TokenIds(Sequence[int]):
    """A decoded BlockStored's token ids, held as one uint32 array rather than a
    list of Python ints: a router keyed by block hashes never reads them, and one
    that re-keys hashes them straight from `array`. Reads, compares and re-encodes
    as the list of the same ints (and, like a list, is unhashable)."""

    __slots__ = ("array",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return self.array[index].tolist()  # type: ignore[no-any-return]
        return int(self.array[index])

    def __iter__(self) -> Iterator[int]:
        return iter(self.array.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenIds):
            return bool(np.array_equal(self.array, other.array))
        if isinstance(other, list):
            return self.array.tolist() == other  # type: ignore[no-any-return]
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self.array.tolist())

    def tolist(self) -> list[int]:
        return self.array.tolist()  # type: ignore[no-any-return]


def _hashable(value: Any) -> Any:
    """`value` with every list turned into a tuple, recursively, so it can be hashed."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, TokenIds):
        return tuple(value.array.tolist())
    return value


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of all KV cache events; the tag is the subclass name.

    Events hash like vLLM's, over every field (its event aggregator counts equal
    events across workers by putting them in dicts); equal events hash equally.
    """

    def __hash__(self) -> int:
        return hash((type(self).__name__, _hashable(astuple(self))))


class BlockStored(KVCacheEvent):
    """Consecutive full blocks of one request became cached in one KV cache group.

    `parent_block_hash` is the hash of the block before the first one here (None
    for the first block of a prompt); `token_ids` holds `block_size` tokens per
    block (a list, or a `TokenIds` when decoded); `kv_cache_spec_kind` and
    `kv_cache_spec_sliding_window` describe the group so a consumer can apply that
    group's hit rules.
    """

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks of one group left the prefix cache (evicted or reset).

    Its field types carry the default decode limits, so a batch decodes straight
    into it: removals are nearly every event (one per evicted block), and a decoder
    with the default limits then makes no second copy of each."""

    block_hashes: _RemovedHashes
    medium: _Medium
    group_idx: _Group = None


class AllBlocksCleared(KVCacheEvent):
    """The engine dropped its whole prefix cache."""


KVCacheEventType = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    """The unit published per engine step."""

    events: list[KVCacheEventType]


def without_token_ids(batch: KVEventBatch) -> KVEventBatch:
    """The batch with every BlockStored's `token_ids` emptied: a router keyed by block
    hashes needs no tokens, and a tenant's prompt then never crosses the wire."""
    events = [
        msgspec.structs.replace(e, token_ids=[]) if type(e) is BlockStored else e
        for e in batch.events
    ]
    return msgspec.structs.replace(batch, events=events)


# --- Codec -----------------------------------------------------------------
#
# Decoding goes through private "checked" mirrors of the structs above, built
# from their field lists (so they cannot drift in names, order or defaults) with
# msgspec constraints added per field name. msgspec then enforces every limit in
# C while it decodes. Two paths give the same batches:
# - fast: array-encoded BlockRemoved and AllBlocksCleared decode straight into the
#   public structs (BlockRemoved's types carry the default limits), and BlockStored's
#   token ids are kept as raw msgpack, read into a uint32 array by a compiled scan
#   that accepts only arrays of unsigned ints within the limits;
# - checked: every event into its mirror, token ids into Python ints, each mirror
#   rebuilt as its public struct from its field tuple.
# A payload the fast path refuses for any reason is decoded again by the checked
# path, so what is rejected, and with which kind, is the checked path's answer.
# `python -m benchmarks.scale` measures the difference on a captured event stream.


class WireEncoding(enum.Enum):
    """How events are laid out inside a batch (the batch itself is always an array)."""

    ARRAY = "array"  # vLLM up to 0.23 and our replicas: [tag, field, ...], every field sent
    MAP = "map"  # vLLM 0.24+: {"type": tag, field: value, ...}, default-valued fields omitted


_EVENT_TYPES: tuple[type[KVCacheEvent], ...] = (BlockStored, BlockRemoved, AllBlocksCleared)
_MAP_FIRST_BYTES = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map16, map32
_OUT_OF_RANGE = re.compile(r"` (?:of length )?[<>]=? ")


def _mirror_fields(cls: type[msgspec.Struct], types: dict[str, Any]) -> list[tuple[Any, ...]]:
    """`cls`'s fields in wire order with checked types; a field without one fails at import."""
    return [
        (f.name, types[f.name]) if f.required else (f.name, types[f.name], f.default)
        for f in msgspec.structs.fields(cls)
    ]


_TOKENS_AT = BlockStored.__struct_fields__.index("token_ids")
_UINT32_MAX = 2**32 - 1


@njit(cache=True, inline="always")
def _be(buf: np.ndarray, pos: int, width: int) -> np.uint64:
    """The big-endian unsigned int of `width` bytes at `pos`."""
    value = np.uint64(0)
    for i in range(width):
        value = (value << np.uint64(8)) | np.uint64(buf[pos + i])
    return value


@njit(cache=True)
def _unpack_tokens(buf: np.ndarray, max_count: int, max_token: int) -> tuple[np.ndarray, bool]:
    """The msgpack array of unsigned ints in `buf` (exactly one value) as uint32, and
    True; or an empty array and False for anything else: another type, a signed
    int encoding, more than `max_count` items or one past `max_token` (at most
    2**32 - 1). False is a refusal, not a verdict: the caller decodes again, checked."""
    empty = np.empty(0, np.uint32)
    size = buf.size
    if size == 0:
        return empty, False
    head = buf[0]
    if 0x90 <= head <= 0x9F:
        count, pos = np.int64(head) - 0x90, 1
    elif head == 0xDC and size >= 3:
        count, pos = np.int64(_be(buf, 1, 2)), 3
    elif head == 0xDD and size >= 5:
        count, pos = np.int64(_be(buf, 1, 4)), 5
    else:
        return empty, False
    if count > max_count or count > size:
        return empty, False
    out = np.empty(count, np.uint32)
    limit = np.uint64(max_token)
    for i in range(count):
        if pos >= size:
            return empty, False
        kind = buf[pos]
        if kind <= 0x7F:  # positive fixint
            value, continue_at = np.uint64(kind), pos + 1
        elif 0xCC <= kind <= 0xCF:  # uint8, uint16, uint32, uint64
            width = 1 << (np.int64(kind) - 0xCC)
            if pos + 1 + width > size:
                return empty, False
            value = _be(buf, pos + 1, width)
            continue_at = pos + 1 + width
        else:
            return empty, False
        if value > limit:
            return empty, False
        out[i] = value
        pos = continue_at
    if pos != size:
        return empty, False
    return out, True


class _Schema:
    """Checked mirrors of the wire structs for one set of limits, and their decoders."""

    def __init__(self, limits: DecodeLimits) -> None:
        types = _field_types(limits)
        raw_tokens = {**types, "token_ids": msgspec.Raw}
        self.max_token_ids = limits.max_token_ids
        self.max_token = min(limits.max_token_id, _UINT32_MAX)
        # BlockRemoved's own types are the default limits' checks.
        removed_is_public = all(
            getattr(limits, name) == getattr(DEFAULT_LIMITS, name)
            for name in ("max_block_hashes", "max_hash_bytes", "max_str_len", "max_group_idx")
        )
        self.public: dict[type, type[KVCacheEvent]] = {}
        self.map_type: dict[type[KVCacheEvent], type[msgspec.Struct]] = {}
        unions: dict[str, list[type[msgspec.Struct]]] = {
            "array": [],
            "map": [],
            "fast_array": [],
            "fast_map": [],
        }
        self.raw_stored: set[type] = set()
        for cls in _EVENT_TYPES:
            name = cls.__name__
            for prefix, field_types in (("", types), ("Fast", raw_tokens)):
                fields = _mirror_fields(cls, field_types)
                as_array = msgspec.defstruct(
                    f"{prefix}Array{name}", fields, tag=name, array_like=True, gc=False
                )
                as_map = msgspec.defstruct(
                    f"{prefix}Map{name}",
                    fields,
                    tag=name,
                    tag_field="type",
                    omit_defaults=True,
                    gc=False,
                )
                self.public[as_array] = self.public[as_map] = cls
                if prefix:
                    public_array = cls is AllBlocksCleared or (
                        cls is BlockRemoved and removed_is_public
                    )
                    unions["fast_array"].append(cls if public_array else as_array)
                    unions["fast_map"].append(as_map)
                    if cls is BlockStored:
                        self.raw_stored.update((as_array, as_map))
                else:
                    self.map_type[cls] = as_map
                    unions["array"].append(as_array)
                    unions["map"].append(as_map)
        union = {key: Union[tuple(members)] for key, members in unions.items()}  # noqa: UP007

        def batch_decoder(name: str, event_type: Any) -> msgspec.msgpack.Decoder:
            types["events"] = Annotated[list[event_type], Meta(max_length=limits.max_events)]
            fields = _mirror_fields(KVEventBatch, types)
            return msgspec.msgpack.Decoder(
                msgspec.defstruct(name, fields, array_like=True, gc=False)
            )

        # Whole-batch decoders, tried in order: one C call when all events share an encoding.
        self.uniform_batch = (
            batch_decoder("ArrayBatch", union["array"]),
            batch_decoder("MapBatch", union["map"]),
        )
        self.fast_uniform_batch = (
            batch_decoder("FastArrayBatch", union["fast_array"]),
            batch_decoder("FastMapBatch", union["fast_map"]),
        )
        self.raw_batch = batch_decoder("RawBatch", msgspec.Raw)
        self.event = (
            msgspec.msgpack.Decoder(union["array"]),
            msgspec.msgpack.Decoder(union["map"]),
        )
        self.fast_event = (
            msgspec.msgpack.Decoder(union["fast_array"]),
            msgspec.msgpack.Decoder(union["fast_map"]),
        )

    def checked(self, payload: bytes | memoryview) -> KVEventBatch:
        """The checked path; raises msgspec's error for the payload's first fault."""
        batch, events = self._events(payload, self.uniform_batch, self.event)
        public = self.public
        return KVEventBatch(
            batch.ts, [public[type(e)](*astuple(e)) for e in events], batch.data_parallel_rank
        )

    def fast(self, payload: bytes | memoryview) -> KVEventBatch | None:
        """The fast path, or None where it refuses (then use `checked`)."""
        try:
            batch, events = self._events(payload, self.fast_uniform_batch, self.fast_event)
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            return None
        kinds = list(map(type, events))
        if kinds.count(BlockRemoved) + kinds.count(AllBlocksCleared) < len(kinds):
            public, raw_stored = self.public, self.raw_stored
            for i, kind in enumerate(kinds):
                if kind is BlockRemoved or kind is AllBlocksCleared:
                    continue
                fields = astuple(events[i])
                if kind in raw_stored:
                    buf = np.frombuffer(fields[_TOKENS_AT], np.uint8)
                    tokens, ok = _unpack_tokens(buf, self.max_token_ids, self.max_token)
                    if not ok:
                        return None
                    fields = (*fields[:_TOKENS_AT], TokenIds(tokens), *fields[_TOKENS_AT + 1 :])
                events[i] = public[kind](*fields)
        return KVEventBatch(batch.ts, events, batch.data_parallel_rank)

    def _events(
        self,
        payload: bytes | memoryview,
        uniform: tuple[msgspec.msgpack.Decoder, ...],
        by_encoding: tuple[msgspec.msgpack.Decoder, msgspec.msgpack.Decoder],
    ) -> tuple[Any, list[Any]]:
        for decoder in uniform:
            try:
                batch = decoder.decode(payload)
                return batch, batch.events
            except msgspec.ValidationError:
                continue  # a wrong guess fails at its first event, which is cheap
        # Mixed encodings, or bad input: decode each event by its own first byte.
        batch = self.raw_batch.decode(payload)
        array_event, map_event = by_encoding
        return batch, [
            (map_event if memoryview(raw)[0] in _MAP_FIRST_BYTES else array_event).decode(raw)
            for raw in batch.events
        ]


@functools.lru_cache(maxsize=8)
def _schema(limits: DecodeLimits) -> _Schema:
    return _Schema(limits)


def _kind_of(error: msgspec.ValidationError) -> MalformedKind:
    """Map msgspec's validation message to a kind (the kinds are pinned by tests)."""
    message = str(error)
    if message.startswith("Invalid value"):
        return MalformedKind.UNKNOWN_TAG
    if "of length <=" in message:
        return MalformedKind.TOO_LARGE
    if _OUT_OF_RANGE.search(message):
        return MalformedKind.BAD_VALUE
    return MalformedKind.WRONG_TYPE


class EventDecoder(Protocol):
    """Reads one engine kind's published payloads: each becomes a `KVEventBatch`
    whose values lie within `limits`, or raises `MalformedInputError`."""

    limits: DecodeLimits

    def decode(self, payload: bytes | memoryview) -> KVEventBatch: ...


class KVEventDecoder:
    """Typed, bounded decoder for one batch payload.

    Each event's encoding (array or vLLM 0.24+ map) is read from its own bytes,
    never configured. A payload either decodes to a `KVEventBatch` whose values
    all lie within `limits`, or raises `MalformedInputError`; nothing else escapes.
    BlockStored's token ids come as a `TokenIds` (as a list when the payload took
    the checked path).

    An array-encoded payload that `scan_frame` accepts (what our replicas and vLLM
    up to 0.23 publish) decodes to a batch whose `events` is a `ScannedEvents`: its
    op arrays now, the events themselves when first read, from `decode_events`.
    """

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._schema = _schema(limits)
        self._scan_limits = limit_array(limits)

    def decode(self, payload: bytes | memoryview) -> KVEventBatch:
        if len(payload) > self.limits.max_payload_bytes:
            raise MalformedInputError(
                MalformedKind.OVERSIZED_PAYLOAD,
                f"{len(payload)} bytes > {self.limits.max_payload_bytes}",
            )
        # Held for a later decode of the events: a view could change under it.
        payload = payload if type(payload) is bytes else bytes(payload)
        scanned = scan_frame(payload, self._scan_limits, self.decode_events)
        if scanned is None:
            return self.decode_events(payload)
        return KVEventBatch(*scanned)  # type: ignore[arg-type]

    def decode_events(self, payload: bytes | memoryview) -> KVEventBatch:
        """The payload decoded into event structs (no scan): the fast path, or the
        checked one where the fast path refuses."""
        batch = self._schema.fast(payload)
        return batch if batch is not None else self.decode_checked(payload)

    def decode_checked(self, payload: bytes | memoryview) -> KVEventBatch:
        """The checked path alone: what `decode` falls back to when the fast path
        refuses a payload, and the reference the tests hold the fast path to."""
        try:
            return self._schema.checked(payload)
        except msgspec.ValidationError as exc:
            raise MalformedInputError(_kind_of(exc), str(exc)) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgpack text must be UTF-8
            raise MalformedInputError(MalformedKind.NOT_MSGPACK, str(exc)) from None
        except RecursionError:
            raise MalformedInputError(MalformedKind.TOO_LARGE, "nesting too deep") from None


def _encode_token_ids(value: Any) -> Any:
    if isinstance(value, TokenIds):
        return value.tolist()
    if isinstance(value, ScannedEvents):
        return value.events
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


class KVEventEncoder:
    """Encodes batches; `WireEncoding.ARRAY` gives the seed's bytes exactly."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_encode_token_ids)
        self._map_type = _schema(DEFAULT_LIMITS).map_type

    def encode(self, batch: KVEventBatch, encoding: WireEncoding = WireEncoding.ARRAY) -> bytes:
        if encoding is WireEncoding.ARRAY:
            return self._encoder.encode(batch)
        map_type = self._map_type
        events = [map_type[type(e)](*astuple(e)) for e in batch.events]
        return self._encoder.encode([batch.ts, events, batch.data_parallel_rank])


_DEFAULT_DECODER = KVEventDecoder()
_DEFAULT_ENCODER = KVEventEncoder()


def decode_batch(payload: bytes | memoryview) -> KVEventBatch:
    """Decode one payload with the default limits (see `KVEventDecoder`)."""
    return _DEFAULT_DECODER.decode(payload)


def encode_batch(batch: KVEventBatch, encoding: WireEncoding = WireEncoding.ARRAY) -> bytes:
    """Encode one batch (see `KVEventEncoder`)."""
    return _DEFAULT_ENCODER.encode(batch, encoding)
