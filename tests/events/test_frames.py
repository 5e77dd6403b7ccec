"""Frame layouts of the transport, parsed and built in one place."""

from __future__ import annotations

import pytest

from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.frames import (
    END_SEQ,
    pack_seq,
    parse_live,
    parse_replay_reply,
    parse_replay_request,
    replay_end,
    replay_reply,
    replay_request,
    unpack_seq,
)


def test_seq_is_eight_bytes_big_endian() -> None:
    assert pack_seq(0) == b"\0" * 8
    assert pack_seq(258) == b"\0\0\0\0\0\0\x01\x02"
    assert unpack_seq(b"\0\0\0\0\0\0\x01\x02") == 258


def test_the_end_marker_is_minus_one_as_signed_eight_bytes() -> None:
    assert (-1).to_bytes(8, "big", signed=True) == END_SEQ


def test_live_frames_give_seq_and_payload() -> None:
    assert parse_live([b"topic", pack_seq(7), b"payload"]) == (7, b"payload")


@pytest.mark.parametrize("frames", [[pack_seq(1), b"p"], [b"t", pack_seq(1), b"p", b"x"], []])
def test_live_messages_with_the_wrong_frame_count_are_rejected(frames: list[bytes]) -> None:
    with pytest.raises(MalformedInputError) as info:
        parse_live(frames)
    assert info.value.kind is MalformedKind.FRAME_COUNT


@pytest.mark.parametrize("seq_frame", [b"", b"\0" * 7, b"\0" * 9])
def test_a_seq_frame_that_is_not_eight_bytes_is_truncated(seq_frame: bytes) -> None:
    with pytest.raises(MalformedInputError) as info:
        parse_live([b"", seq_frame, b"p"])
    assert info.value.kind is MalformedKind.TRUNCATED_FRAME


def test_replay_request_and_reply_frames_match_vllm() -> None:
    assert replay_request(5) == [b"", pack_seq(5)]
    assert parse_replay_request([b"id", b"", pack_seq(5)]) == (b"id", 5)
    assert replay_reply(b"id", pack_seq(5), b"p") == [b"id", b"", pack_seq(5), b"p"]
    assert replay_end(b"id") == [b"id", b"", END_SEQ, b""]


@pytest.mark.parametrize(
    "frames", [[b"id", pack_seq(5)], [b"id", b"x", pack_seq(5)], [b"id", b"", pack_seq(5), b""]]
)
def test_bad_replay_requests_are_rejected(frames: list[bytes]) -> None:
    with pytest.raises(MalformedInputError) as info:
        parse_replay_request(frames)
    assert info.value.kind is MalformedKind.FRAME_COUNT


def test_replay_replies_are_accepted_with_and_without_a_topic_frame() -> None:
    assert parse_replay_reply([b"", pack_seq(3), b"p"]) == (3, b"p")
    assert parse_replay_reply([b"", b"topic", pack_seq(3), b"p"]) == (3, b"p")
    assert parse_replay_reply([b"", END_SEQ, b""]) == (None, b"")
    assert parse_replay_reply([b"", b"", END_SEQ, b""]) == (None, b"")


@pytest.mark.parametrize(
    ("frames", "kind"),
    [
        ([b"", pack_seq(3)], MalformedKind.FRAME_COUNT),
        ([b"x", pack_seq(3), b"p"], MalformedKind.FRAME_COUNT),
        ([b"", b"t", b"u", pack_seq(3), b"p"], MalformedKind.FRAME_COUNT),
        ([b"", b"\x01\x02", b"p"], MalformedKind.TRUNCATED_FRAME),
    ],
)
def test_bad_replay_replies_are_rejected(frames: list[bytes], kind: MalformedKind) -> None:
    with pytest.raises(MalformedInputError) as info:
        parse_replay_reply(frames)
    assert info.value.kind is kind
