"""Routing decisions shared between the routers of a tier.

A router's predicted entries (the blocks it expects a replica to cache because it
just sent it a prompt) would otherwise be known to it alone: a burst of one
conversation spread over several routers would land on several replicas. Each
router therefore tells its peers where it sent what, as a `PeerDecision`, and
each peer records the same predicted entries its sender did.

Invariants:
- A `PeerDecision` is self-contained: the prompt's block keys (the event form of
  its block hashes, so LoRA, salt and extra keys are already folded in) at the
  sender's hash block size. The receiver derives each KV cache group's keys
  from its own registration of the replica, exactly as for its own prediction.
- `seq` counts one sender's decisions from 0, so a receiver can count the ones it
  lost; a lower seq than the last seen means the sender restarted.
- A `PeerBeat` carries the sender's next seq about once a second: it tells a
  receiver its subscription is live (PUB/SUB joins late and silently), and lets
  it count decisions lost at the tail of a burst, which no later decision reveals.
- Decoding is bounded and typed: ids are short strings, keys are uint64.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import msgspec

from kvroute.replicas.kv_cache.prompt import HashedPrompt
from kvroute.router.index.ingest import event_keys

MAX_PEER_KEYS = 1 << 18  # 4M tokens at 16-token blocks: beyond any model's context

# msgpack has no integer above 2**64 - 1, so a lower bound makes a uint64.
UInt64 = Annotated[int, msgspec.Meta(ge=0)]
ShortId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class PeerDecision(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One router's choice of a replica for one prompt, as its peers apply it.

    Encoded as a msgpack array (no field names on the wire): about 9 bytes per block.
    """

    router_id: ShortId
    seq: Annotated[int, msgspec.Meta(ge=0)]
    replica_id: ShortId
    hash_block_size: Annotated[int, msgspec.Meta(ge=1)]
    block_keys: Annotated[list[UInt64], msgspec.Meta(max_length=MAX_PEER_KEYS)]
    # The sender's wall clock (time.time()) when it chose; for lag metrics only:
    # routers' clocks need not agree, so no rule depends on it.
    ts: float


class PeerBeat(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A sender is alive, and `next_seq` is the seq its next decision will carry."""

    router_id: ShortId
    next_seq: Annotated[int, msgspec.Meta(ge=0)]


class DecisionOrigin:
    """One router as a sender: its id and the seq of its next decision."""

    def __init__(self, router_id: str, wall_clock: Callable[[], float] = time.time) -> None:
        self.router_id = router_id
        self.wall_clock = wall_clock
        self.next_seq = 0

    def decision(self, replica_id: str, prompt: HashedPrompt) -> PeerDecision:
        """This router sent `prompt` to `replica_id`: the message its peers apply."""
        seq = self.next_seq
        self.next_seq = seq + 1
        return PeerDecision(
            router_id=self.router_id,
            seq=seq,
            replica_id=replica_id,
            hash_block_size=prompt.hasher.block_size,
            block_keys=event_keys(prompt.block_hashes).tolist(),
            ts=self.wall_clock(),
        )

    def beat(self) -> PeerBeat:
        return PeerBeat(router_id=self.router_id, next_seq=self.next_seq)


class PeerDecisionCodec:
    """msgpack encoder and typed decoders of `PeerDecision`s and `PeerBeat`s (reused)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(PeerDecision)
        self._beat_decoder = msgspec.msgpack.Decoder(PeerBeat)

    def encode(self, message: PeerDecision | PeerBeat) -> bytes:
        return self._encoder.encode(message)

    def decode(self, payload: bytes) -> PeerDecision:
        """Raises msgspec.DecodeError (ValidationError included) on a malformed payload."""
        return self._decoder.decode(payload)

    def decode_beat(self, payload: bytes) -> PeerBeat:
        """Raises msgspec.DecodeError (ValidationError included) on a malformed payload."""
        return self._beat_decoder.decode(payload)


__all__ = ["MAX_PEER_KEYS", "DecisionOrigin", "PeerBeat", "PeerDecision", "PeerDecisionCodec"]
