"""The data plane's wire format: requests and their streams between router and replica.

A router's DEALER talks to a replica's ROUTER socket (`replicas.data_server`) in
multipart frames, every payload msgpack (msgspec), as vLLM's front end talks to
its engine core; Ray only places and restarts replicas.

- router -> replica: `[GENERATE, GenerateRequest]` (streamed), `[GENERATE_WHOLE,
  GenerateRequest]` (the result alone, no chunks) or `[ABORT, request id]`.
- replica -> router: `[kind, request id, payload]`, kind `CHUNK` (a StreamChunk),
  `RESULT` (the GenerateResult, the stream's last frame) or `ERROR` (an
  `ErrorFrame`, also last). The request id travels bare, so a router demultiplexes
  without decoding the payload.
"""

from __future__ import annotations

from typing import Literal

import msgspec

GENERATE = b"G"
GENERATE_WHOLE = b"W"
ABORT = b"A"
CHUNK = b"C"
RESULT = b"R"
ERROR = b"E"

# What went wrong, as the Ray path tells it apart: the request is at fault
# (InvalidRequestError), the engine failed this one request (RequestFailedError),
# it was aborted (RequestAbortedError), or the replica cannot serve (its engine died).
ErrorKind = Literal["invalid", "failed", "aborted", "unavailable"]


class ErrorFrame(msgspec.Struct, frozen=True, array_like=True):
    kind: ErrorKind
    message: str
    param: str | None = None  # InvalidRequestError's request field at fault
