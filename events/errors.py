"""The kinds of bad input the event stream rejects, and the error that carries them.

Every rejected frame or payload maps to exactly one `MalformedKind`, so a
subscriber can count and log bad input per kind and drop it without guessing.
"""

from __future__ import annotations

import enum


class MalformedKind(enum.Enum):
    """Why a frame or payload was rejected."""

    FRAME_COUNT = "frame_count"  # a multipart message with the wrong number of frames
    TRUNCATED_FRAME = "truncated_frame"  # a sequence frame that is not 8 bytes
    OVERSIZED_PAYLOAD = "oversized_payload"  # a payload over the configured byte limit
    NOT_MSGPACK = "not_msgpack"  # bytes that are not one complete msgpack value
    UNKNOWN_TAG = "unknown_tag"  # an event whose tag names no known event type
    WRONG_TYPE = "wrong_type"  # a value of the wrong type or shape for its field
    BAD_VALUE = "bad_value"  # a negative, oversized or non-finite number
    TOO_LARGE = "too_large"  # a list longer than its limit, or nesting too deep


class MalformedInputError(ValueError):
    """Input that violates the wire contract; `kind` says which rule it broke."""

    def __init__(self, kind: MalformedKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
