"""A replica's data plane: `ReplicaCore.generate_stream` served on a ZeroMQ ROUTER socket.

Runs on the serving loop beside the Ray methods (which stay). Each generate frame
becomes one task streaming the request's frames back to the router that sent it
(see `replicas.data_wire`); an abort frame, or the router's disconnection, cancels
that task, which aborts the request in the engine. A frame that does not parse is
counted in `malformed` and dropped (so is a second request under an id still
streaming to the same router): it never stops the server. With a CURVE config
the socket takes only clients that complete the handshake with an allowed key, as
the event sockets do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from kvroute.events.curve import CurveServerConfig, secure_server, start_authenticator
from kvroute.events.endpoints import bound_endpoint
from kvroute.replicas.api import (
    EngineDeadError,
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    RequestAbortedError,
    RequestFailedError,
    StreamChunk,
)
from kvroute.replicas.data_wire import (
    ABORT,
    CHUNK,
    ERROR,
    GENERATE,
    GENERATE_WHOLE,
    RESULT,
    ErrorFrame,
)
from kvroute.replicas.serving import ReplicaCore

logger = logging.getLogger(__name__)

# Frames queued to one router before sends wait: far above one step's chunks for
# `max_requests_per_replica` requests.
SEND_HWM = 100_000


def error_frame(exc: Exception) -> ErrorFrame:
    """The frame telling the router how a request ended in `exc` (never internals)."""
    if isinstance(exc, InvalidRequestError):
        return ErrorFrame("invalid", str(exc), exc.param)
    if isinstance(exc, RequestFailedError):
        return ErrorFrame("failed", str(exc))
    if isinstance(exc, RequestAbortedError):
        return ErrorFrame("aborted", str(exc))
    if isinstance(exc, EngineDeadError):
        return ErrorFrame("unavailable", str(exc))
    return ErrorFrame("failed", "the request failed in the replica")


class DataServer:
    """Binds at construction (so `endpoint` can be registered), serves from `start()`."""

    def __init__(
        self, core: ReplicaCore, endpoint: str, curve: CurveServerConfig | None = None
    ) -> None:
        self.core = core
        self.malformed = 0  # frames dropped because they did not parse
        self._ctx = zmq.asyncio.Context(io_threads=1)
        self._auth = start_authenticator(self._ctx, curve) if curve else None
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.sndhwm = SEND_HWM
        # A frame to a router that has gone raises instead of vanishing, so its
        # streams stop and their requests free their blocks.
        self._sock.router_mandatory = True
        if curve is not None:
            secure_server(self._sock, curve)
        self._sock.bind(endpoint)
        self.endpoint = bound_endpoint(self._sock)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_request = msgspec.msgpack.Decoder(GenerateRequest).decode
        self._streams: dict[tuple[bytes, bytes], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    @property
    def streaming(self) -> int:
        return len(self._streams)

    async def _serve(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._dispatch(frames)
            except (msgspec.DecodeError, ValueError):  # UnicodeDecodeError is a ValueError
                self.malformed += 1

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            raise ValueError("a data frame has a kind and one payload")
        peer, kind, payload = frames
        if kind in (GENERATE, GENERATE_WHOLE):
            request = self._decode_request(payload)
            rid = request.request_id.encode()
            if (peer, rid) in self._streams:  # a router never sends one: ZmqReplica refuses it
                raise ValueError("a request id already streaming")
            serve = (
                self._stream(peer, rid, request)
                if kind == GENERATE
                else self._whole(peer, rid, request)
            )
            task = asyncio.get_running_loop().create_task(serve)
            self._streams[peer, rid] = task
        elif kind == ABORT:
            payload.decode()
            stream = self._streams.pop((peer, payload), None)
            if stream is not None:
                stream.cancel()
        else:
            raise ValueError("unknown frame kind")

    async def _send(self, peer: bytes, kind: bytes, rid: bytes, item: object) -> None:
        """Raises zmq.ZMQError if `peer` has gone. Every operation goes through the
        asyncio socket: a send on a shadow would swallow the readable edge of its
        file descriptor and leave the receiving side asleep."""
        await self._sock.send_multipart((peer, kind, rid, self._encode(item)))

    async def _stream(self, peer: bytes, rid: bytes, request: GenerateRequest) -> None:
        """Stream one request to `peer`; cancelled by an abort frame."""
        items = self.core.generate_stream(request)
        async with contextlib.aclosing(items):
            await self._answer(peer, rid, request, items)

    async def _whole(self, peer: bytes, rid: bytes, request: GenerateRequest) -> None:
        """Send `peer` one request's result alone; cancelled by an abort frame."""
        await self._answer(peer, rid, request, self._result(request))

    async def _result(self, request: GenerateRequest) -> AsyncIterator[GenerateResult]:
        yield await self.core.generate(request)

    async def _answer(
        self,
        peer: bytes,
        rid: bytes,
        request: GenerateRequest,
        items: AsyncIterator[StreamChunk | GenerateResult],
    ) -> None:
        """Send `items` to `peer`, or the error frame of the exception they end in."""
        try:
            async for item in items:
                kind = CHUNK if isinstance(item, StreamChunk) else RESULT
                await self._send(peer, kind, rid, item)
        except zmq.ZMQError:
            pass  # the router has gone: closing the stream aborted the request
        except Exception as exc:
            if not isinstance(exc, InvalidRequestError | RequestAbortedError):
                logger.warning("data plane request %s failed", request.request_id, exc_info=exc)
            with contextlib.suppress(zmq.ZMQError):
                await self._send(peer, ERROR, rid, error_frame(exc))
        finally:
            if self._streams.get((peer, rid)) is asyncio.current_task():
                del self._streams[peer, rid]

    def close(self) -> None:
        """Stop serving and cancel every stream (their requests are aborted)."""
        if self._task is not None:
            self._task.cancel()
        for task in self._streams.values():
            task.cancel()
        self._streams.clear()
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
