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
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, Union

import msgspec
from msgspec import Meta
from msgspec.structs import astuple

from kvroute.events.errors import MalformedInputError, MalformedKind

MEDIUM_GPU = "GPU"

# A block hash as it travels in events: the low 64 bits of the engine's hash as
# an unsigned int (the default), or the raw hash bytes when int hashes are off.
ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A timestamped batch of events from one engine step."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


def _hashable(value: Any) -> Any:
    """`value` with every list turned into a tuple, recursively, so it can be hashed."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(item) for item in value)
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
    block; `kv_cache_spec_kind` and `kv_cache_spec_sliding_window` describe the
    group so a consumer can apply that group's hit rules.
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
    """Blocks of one group left the prefix cache (evicted or reset)."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


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
# C while it decodes, and each mirror event is rebuilt as its public struct from
# its field tuple. Measured on a batch of 64 one-block, 16-token BlockStored events
# (benchmarks/events.py builds it): msgspec's unchecked decode 40-46 us, the checked
# decode 43-47 us, the rebuild 7.5 us; the same checks written as a Python loop over
# an unchecked decode took about twice as long as this whole path.


class WireEncoding(enum.Enum):
    """How events are laid out inside a batch (the batch itself is always an array)."""

    ARRAY = "array"  # vLLM up to 0.23 and our replicas: [tag, field, ...], every field sent
    MAP = "map"  # vLLM 0.24+: {"type": tag, field: value, ...}, default-valued fields omitted


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

_EVENT_TYPES: tuple[type[KVCacheEvent], ...] = (BlockStored, BlockRemoved, AllBlocksCleared)
_MAP_FIRST_BYTES = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map16, map32
_OUT_OF_RANGE = re.compile(r"` (?:of length )?[<>]=? ")


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


def _mirror_fields(cls: type[msgspec.Struct], types: dict[str, Any]) -> list[tuple[Any, ...]]:
    """`cls`'s fields in wire order with checked types; a field without one fails at import."""
    return [
        (f.name, types[f.name]) if f.required else (f.name, types[f.name], f.default)
        for f in msgspec.structs.fields(cls)
    ]


class _Schema:
    """Checked mirrors of the wire structs for one set of limits, and their decoders."""

    def __init__(self, limits: DecodeLimits) -> None:
        types = _field_types(limits)
        self.public: dict[type, type[KVCacheEvent]] = {}
        self.map_type: dict[type[KVCacheEvent], type[msgspec.Struct]] = {}
        array_events: list[type[msgspec.Struct]] = []
        map_events: list[type[msgspec.Struct]] = []
        for cls in _EVENT_TYPES:
            fields = _mirror_fields(cls, types)
            name = cls.__name__
            as_array = msgspec.defstruct(
                f"Array{name}", fields, tag=name, array_like=True, gc=False
            )
            as_map = msgspec.defstruct(
                f"Map{name}", fields, tag=name, tag_field="type", omit_defaults=True, gc=False
            )
            self.public[as_array] = self.public[as_map] = cls
            self.map_type[cls] = as_map
            array_events.append(as_array)
            map_events.append(as_map)
        array_union = Union[tuple(array_events)]  # noqa: UP007 - built at run time
        map_union = Union[tuple(map_events)]  # noqa: UP007 - built at run time

        def batch_decoder(name: str, event_type: Any) -> msgspec.msgpack.Decoder:
            types["events"] = Annotated[list[event_type], Meta(max_length=limits.max_events)]
            fields = _mirror_fields(KVEventBatch, types)
            return msgspec.msgpack.Decoder(
                msgspec.defstruct(name, fields, array_like=True, gc=False)
            )

        # Whole-batch decoders, tried in order: one C call when all events share an encoding.
        self.uniform_batch = (
            batch_decoder("ArrayBatch", array_union),
            batch_decoder("MapBatch", map_union),
        )
        self.raw_batch = batch_decoder("RawBatch", msgspec.Raw)
        self.array_event = msgspec.msgpack.Decoder(array_union)
        self.map_event = msgspec.msgpack.Decoder(map_union)

    def decode_event(self, raw: msgspec.Raw) -> msgspec.Struct:
        """Decode one event, choosing its encoding from its first byte."""
        if memoryview(raw)[0] in _MAP_FIRST_BYTES:
            return self.map_event.decode(raw)
        return self.array_event.decode(raw)


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
    """

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._schema = _schema(limits)

    def decode(self, payload: bytes | memoryview) -> KVEventBatch:
        if len(payload) > self.limits.max_payload_bytes:
            raise MalformedInputError(
                MalformedKind.OVERSIZED_PAYLOAD,
                f"{len(payload)} bytes > {self.limits.max_payload_bytes}",
            )
        try:
            return self._decode(payload)
        except msgspec.ValidationError as exc:
            raise MalformedInputError(_kind_of(exc), str(exc)) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgpack text must be UTF-8
            raise MalformedInputError(MalformedKind.NOT_MSGPACK, str(exc)) from None
        except RecursionError:
            raise MalformedInputError(MalformedKind.TOO_LARGE, "nesting too deep") from None

    def _decode(self, payload: bytes | memoryview) -> Any:
        schema = self._schema
        for decoder in schema.uniform_batch:
            try:
                batch = decoder.decode(payload)
                events = batch.events
                break
            except msgspec.ValidationError:
                continue  # a wrong guess fails at its first event, which is cheap
        else:
            # Mixed encodings, or bad input: decode each event by its own first byte.
            batch = schema.raw_batch.decode(payload)
            events = [schema.decode_event(raw) for raw in batch.events]
        public = schema.public
        return KVEventBatch(
            batch.ts, [public[type(e)](*astuple(e)) for e in events], batch.data_parallel_rank
        )


class KVEventEncoder:
    """Encodes batches; `WireEncoding.ARRAY` gives the seed's bytes exactly."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
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
