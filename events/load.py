"""A replica's load, and how it travels on the replica's event socket.

`ReplicaLoad` is the one load type: the engine measures it, a `load()` call or a
pushed load message carries it, the policies weigh it. It lives with the wire
format because kvroute's own replicas push it on their event socket (frames in
`events.frames`: `[LOAD_TOPIC, payload]`, payload its msgpack map), so the
subscriber can decode it and count bad ones like bad event batches.
"""

from __future__ import annotations

import math

import msgspec

from kvroute.events.errors import MalformedInputError, MalformedKind

# A load message is a handful of small numbers (about 110 bytes as msgpack).
MAX_LOAD_BYTES = 1_024


class ReplicaLoad(msgspec.Struct, frozen=True):
    """A replica's load: the one type the engine reports, the wire carries and the
    policies weigh (the router adds its own pending requests to a report).

    `queued_prefill_tokens` counts prompt tokens not yet prefilled (waiting or
    mid-chunk); `running_seqs` the sequences scheduled, `waiting_seqs` those queued.
    """

    queued_prefill_tokens: int = 0
    running_seqs: int = 0
    kv_usage: float = 0.0
    waiting_seqs: int = 0
    num_cached_blocks: int = 0

    @property
    def active_seqs(self) -> int:
        """Sequences the replica is serving or about to: each slows every step."""
        return self.running_seqs + self.waiting_seqs


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ReplicaLoad)


def encode_load(load: ReplicaLoad) -> bytes:
    return _encoder.encode(load)


def decode_load(payload: bytes | memoryview) -> ReplicaLoad:
    """A pushed load, or MalformedInputError: counts are non-negative and `kv_usage`
    is a fraction in [0, 1]. Unknown fields are ignored and missing ones default, so
    a replica may add fields before its routers know them."""
    if len(payload) > MAX_LOAD_BYTES:
        raise MalformedInputError(
            MalformedKind.OVERSIZED_PAYLOAD, f"load of {len(payload)} bytes > {MAX_LOAD_BYTES}"
        )
    try:
        load = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MalformedInputError(MalformedKind.WRONG_TYPE, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedInputError(MalformedKind.NOT_MSGPACK, str(exc)) from None
    counts = (
        load.queued_prefill_tokens,
        load.running_seqs,
        load.waiting_seqs,
        load.num_cached_blocks,
    )
    if min(counts) < 0 or not (math.isfinite(load.kv_usage) and 0.0 <= load.kv_usage <= 1.0):
        raise MalformedInputError(MalformedKind.BAD_VALUE, f"load out of range: {load}")
    return load
