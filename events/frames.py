"""The ZeroMQ frame layout of vLLM's KV event transport, built and parsed in one place.

- live (PUB -> SUB): `[topic, seq, payload]`
- load (PUB -> SUB, kvroute's own replicas only): `[LOAD_TOPIC, payload]`, beside the live
  batches on the same socket. Its own topic frame and frame count keep it apart from the
  batches, which stay byte-identical to vLLM's; it takes no seq and is never replayed.
- replay request (DEALER -> ROUTER): `[b"", start_seq]`, seen by the ROUTER as
  `[identity, b"", start_seq]`
- replay reply (ROUTER -> DEALER): `[identity, b"", seq, payload]` per buffered batch with
  `seq >= start_seq`, in seq order, then the end marker `[identity, b"", END_SEQ, b""]`.
  Newer vLLM inserts the topic before `seq` in replies (and an empty one before the end
  marker); the DEALER sees both layouts with the identity stripped.

Every seq is an unsigned 8-byte big-endian integer; `END_SEQ` is -1 as a signed one.
"""

from __future__ import annotations

from kvroute.events.errors import MalformedInputError, MalformedKind

SEQ_BYTES = 8
END_SEQ = b"\xff" * SEQ_BYTES
LOAD_TOPIC = b"kvroute.load"

Frames = list[bytes]


def pack_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


def unpack_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise MalformedInputError(
            MalformedKind.TRUNCATED_FRAME, f"seq frame of {len(frame)} bytes, not {SEQ_BYTES}"
        )
    return int.from_bytes(frame, "big")


def parse_live(frames: Frames) -> tuple[int, bytes]:
    """`(seq, payload)` of a live message `[topic, seq, payload]`."""
    if len(frames) != 3:
        raise MalformedInputError(
            MalformedKind.FRAME_COUNT, f"live message of {len(frames)} frames"
        )
    return unpack_seq(frames[1]), frames[2]


def load_message(payload: bytes) -> Frames:
    return [LOAD_TOPIC, payload]


def is_load(frames: Frames) -> bool:
    """A load message, told apart from a live batch by its topic frame alone."""
    return bool(frames) and frames[0] == LOAD_TOPIC


def parse_load(frames: Frames) -> bytes:
    """The payload of a load message `[LOAD_TOPIC, payload]`."""
    if len(frames) != 2:
        raise MalformedInputError(
            MalformedKind.FRAME_COUNT, f"load message of {len(frames)} frames"
        )
    return frames[1]


def replay_request(start_seq: int) -> Frames:
    """What a DEALER sends to ask for every buffered batch from `start_seq` on."""
    return [b"", pack_seq(start_seq)]


def parse_replay_request(frames: Frames) -> tuple[bytes, int]:
    """`(identity, start_seq)` of a request as the ROUTER receives it."""
    if len(frames) != 3 or frames[1]:
        raise MalformedInputError(
            MalformedKind.FRAME_COUNT, f"replay request of {len(frames)} frames"
        )
    return frames[0], unpack_seq(frames[2])


def replay_reply(identity: bytes, seq_frame: bytes, payload: bytes) -> Frames:
    return [identity, b"", seq_frame, payload]


def replay_end(identity: bytes) -> Frames:
    return [identity, b"", END_SEQ, b""]


def parse_replay_reply(frames: Frames) -> tuple[int | None, bytes]:
    """`(seq, payload)` of a reply as the DEALER receives it; seq is None for the end marker."""
    if len(frames) not in (3, 4) or frames[0]:
        raise MalformedInputError(
            MalformedKind.FRAME_COUNT, f"replay reply of {len(frames)} frames"
        )
    seq_frame, payload = frames[-2], frames[-1]
    if seq_frame == END_SEQ:
        return None, b""
    return unpack_seq(seq_frame), payload
