"""kvroute's replicas reached over their ZeroMQ data plane; Ray only for the rest.

A routed request on a Ray actor call costs about a millisecond of CPU across both
ends; here it is one multipart frame out and a frame per chunk back on a DEALER
socket per replica (`replicas.data_wire`), demultiplexed by request id on the
router's loop. Load, snapshots, prefix-cache resets and health stay on the Ray
handle (`RayReplica`), which Ray keeps placed and restarted.

Invariants:
- A request is sent only on a connection whose handshake (CURVE when the replica
  has a key) succeeded; none within `connect_timeout_s` is ReplicaUnavailableError,
  and so, at once, is a request while a connection that was made is down (a replica
  binds a new port when Ray restarts it: the service must re-admit it).
- Every pending request ends: with its result or error frame, or with
  ReplicaUnavailableError as soon as the connection drops or `close()` runs (the
  service closes a replica's backend when it learns the replica died).
- A request buffers at most `max_chunks` chunks: past that, new tokens merge into
  the last one, so a slow reader costs memory in tokens, not in frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute.events.curve import CurveKeyPair, secure_client
from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ReplicaLoad,
    RequestAbortedError,
    RequestFailedError,
    Snapshot,
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
from kvroute.router.engines.backends import ReplicaUnavailableError
from kvroute.router.engines.ray_replica import RayReplica

MAX_CHUNKS = 64
CONNECT_TIMEOUT_S = 5.0
_MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

Item = StreamChunk | GenerateResult | Exception


class _Pending:
    """One request's frames, waiting for its reader."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: Item) -> None:
        items = self.items
        if len(items) >= MAX_CHUNKS and isinstance(item, StreamChunk):
            last = items[-1]
            if isinstance(last, StreamChunk):
                items[-1] = msgspec.structs.replace(
                    item, new_token_ids=last.new_token_ids + item.new_token_ids
                )
                return
        items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> Item:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()


def _error(frame: ErrorFrame, request_id: str) -> Exception:
    """The exception the Ray path raises for the same failure."""
    if frame.kind == "invalid":
        return InvalidRequestError(frame.message, frame.param)
    if frame.kind == "failed":
        return RequestFailedError(request_id)
    if frame.kind == "aborted":
        return RequestAbortedError(frame.message)
    return ReplicaUnavailableError(frame.message)


class ZmqReplica:
    """An `EngineBackend` for a replica actor with a data endpoint."""

    def __init__(
        self,
        ray_backend: RayReplica,
        endpoint: str,
        curve: CurveKeyPair | None = None,
        server_key: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """`curve` and `server_key`: the router's key pair and the replica's public
        key, when the replica serves CURVE (both or neither)."""
        if (curve is None) != (server_key is None):
            raise ValueError("a CURVE data plane needs both the router's keys and the replica's")
        self.ray = ray_backend
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.malformed = 0  # reply frames dropped because they did not parse
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.immediate = True  # queue nothing for a connection not yet made
        if curve is not None and server_key is not None:
            secure_client(self._sock, curve, server_key)
        self._monitor = self._sock.get_monitor_socket(_MONITORED)
        self._sock.connect(endpoint)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decoders = {
            CHUNK: msgspec.msgpack.Decoder(StreamChunk).decode,
            RESULT: msgspec.msgpack.Decoder(GenerateResult).decode,
            ERROR: msgspec.msgpack.Decoder(ErrorFrame).decode,
        }
        self._pending: dict[str, _Pending] = {}
        self._connected = asyncio.Event()
        self._dropped = False  # connected once, down since
        self._closed = False
        loop = asyncio.get_running_loop()
        self._tasks = (loop.create_task(self._read()), loop.create_task(self._watch()))

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------------- requests

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """The result alone: the replica sends no chunks."""
        items = self._items(request, GENERATE_WHOLE)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, GenerateResult):
                    return item
        raise ReplicaUnavailableError(f"replica sent no result for {request.request_id}")

    def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        return self._items(request, GENERATE)

    async def _items(
        self, request: GenerateRequest, kind: bytes
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        rid = request.request_id
        if rid in self._pending:
            raise InvalidRequestError(f"request id {rid!r} is already in flight")
        pending = self._pending[rid] = _Pending()
        try:
            await self._send((kind, self._encode(request)))
            while True:
                item = await pending.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, GenerateResult):
                    return
        finally:
            if self._pending.get(rid) is pending:
                del self._pending[rid]

    async def _send(self, frames: tuple[bytes, bytes]) -> None:
        if self._closed or self._dropped:
            raise ReplicaUnavailableError(f"the data connection to {self.endpoint} is closed")
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), self.connect_timeout_s)
            except TimeoutError:
                raise ReplicaUnavailableError(
                    f"no data connection to {self.endpoint} within {self.connect_timeout_s:g} s"
                ) from None
        # Through the asyncio socket only: a send on a shadow socket would swallow the
        # readable edge of its file descriptor and leave `_read` asleep.
        sent = self._sock.send_multipart(frames)
        try:
            if not sent.done():  # the connection dropped since: wait for another
                await asyncio.wait_for(sent, self.connect_timeout_s)
            sent.result()
        except (zmq.ZMQError, TimeoutError) as exc:
            raise ReplicaUnavailableError(f"cannot send to {self.endpoint}: {exc}") from None

    def abort(self, request_id: str) -> None:
        """Tell the replica to stop; a reader still waiting gets RequestAbortedError."""
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.put(RequestAbortedError(f"request {request_id} was aborted"))
        if self._connected.is_set() and not self._closed:
            sent = self._sock.send_multipart((ABORT, request_id.encode()))
            if sent.done():
                sent.exception()  # best effort: a replica gone has nothing to stop
            else:
                sent.cancel()

    # ------------------------------------------------------------------ frames

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                kind, rid, payload = frames
                item = self._decoders[kind](payload)
                request_id = rid.decode()
            except (ValueError, KeyError, msgspec.DecodeError, msgspec.ValidationError):
                self.malformed += 1
                continue
            pending = self._pending.get(request_id)
            if pending is None:
                continue  # aborted or failed here already
            pending.put(_error(item, request_id) if isinstance(item, ErrorFrame) else item)

    async def _watch(self) -> None:
        """Follow the connection: usable after a handshake, and a drop fails every
        pending request (the replica died or restarted; nothing in flight survives)."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected.set()
                self._dropped = False
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected.clear()
                self._dropped = True
                self._fail_all(f"the data connection to {self.endpoint} dropped")

    def _fail_all(self, message: str) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.put(ReplicaUnavailableError(message))

    # --------------------------------------------------- the rest, over Ray

    async def load(self) -> ReplicaLoad:
        return await self.ray.load()

    async def snapshot(self) -> Snapshot | None:
        return await self.ray.snapshot()

    async def reset_prefix_cache(self) -> bool:
        return await self.ray.reset_prefix_cache()

    async def healthy(self) -> bool:
        return await self.ray.healthy()

    async def close(self) -> None:
        """Fail every pending request with ReplicaUnavailableError and close the socket."""
        if self._closed:
            return
        self._closed = True
        self._connected.clear()
        self._fail_all(f"replica at {self.endpoint} was removed")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        await self.ray.close()
