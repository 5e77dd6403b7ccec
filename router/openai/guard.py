"""What aiohttp's server lacks against slow, numerous or malformed clients: a
deadline for a request's headers, a cap on open connections (in all and per client
address), and OpenAI's error envelope for what aiohttp refuses before any handler
runs (bad framing, an unknown content encoding).

`GuardedSite` listens like `web.TCPSite`, but each accepted connection is a
`GuardedConnection` that forwards every protocol event to aiohttp's own protocol.
Invariants:

- At most `max_connections` connections are open. One over the cap is accepted,
  answered 503 and closed at once, and aiohttp never sees it. (Accepting and closing
  rather than pausing accept(): the client learns at once and can retry elsewhere,
  instead of waiting in a kernel backlog that nobody reads.)
- A request's headers are complete within `header_timeout_s` of the connection
  opening or, on a keep-alive connection, of the next request's first byte; otherwise
  the connection is answered 408 and closed. The deadline is off while a request is
  handled (its body has `body_timeout_s`, its response takes as long as it takes),
  while aiohttp still receives a body the handler left unread, and while the
  connection idles between requests (aiohttp's keepalive_timeout closes it): a 408
  only ever answers bytes of a request, never interrupts a kept-alive idle connection.
- No client address holds more than `max_connections_per_client` of them: one more
  is answered 429 and closed.
- An admitted connection is counted from `connection_made` until `connection_lost`,
  exactly once, in all and for its address.
- Malformed input is logged without a traceback, at most once per
  `MALFORMED_LOG_INTERVAL_S` (with the count since), so a client cannot flood the log.

Headers that complete within an event-loop iteration or two of the deadline may
still be refused: the deadline is cancelled when aiohttp starts the request's handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

MALFORMED_LOG_INTERVAL_S = 10.0

logger = logging.getLogger(__name__)

# Called with the status and error kind of each refusal (for the metrics).
Recorder = Callable[[int, str], None]


def _reply(status: HTTPStatus, kind: str, code: str, message: str) -> bytes:
    """A complete HTTP response with OpenAI's error envelope, closing the connection."""
    error = {"message": message, "type": kind, "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(["Retry-After: 1"] if status in (HTTPStatus.SERVICE_UNAVAILABLE, 429) else []),
    ]
    return "\r\n".join([*head, "", ""]).encode() + body


TOO_MANY_CONNECTIONS = _reply(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "service_unavailable",
    "too_many_connections",
    "too many open connections",
)
TOO_MANY_CLIENT_CONNECTIONS = _reply(
    HTTPStatus.TOO_MANY_REQUESTS,
    "rate_limit_error",
    "too_many_client_connections",
    "too many open connections from this address",
)
HEADER_TIMEOUT = _reply(
    HTTPStatus.REQUEST_TIMEOUT,
    "timeout_error",
    "header_timeout",
    "the request headers came too slowly",
)


class RateLimitedLog:
    """One warning line per `interval_s` at most, saying how many were held back."""

    def __init__(self, interval_s: float = MALFORMED_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} more like it not logged)"
        logger.warning(message, *args)
        self.suppressed = 0
        self._next = now + self.interval_s


MALFORMED = RateLimitedLog()


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's protocol, answering what it refuses itself (bad framing, a body it
    cannot decode) with OpenAI's error envelope, logged as `MALFORMED` says."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.logger.error("request from %s failed", request.remote, exc_info=exc)
            text, kind = "internal error", "server_error"
        else:
            reason = getattr(exc, "message", None) or message or HTTPStatus(status).phrase
            text, kind = f"malformed request: {reason}"[:300], "invalid_request_error"
            MALFORMED.warning("malformed request from %s: %s", request.remote, text)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was under way; the connection is broken")
        error = {"message": text, "type": kind, "param": None, "code": None}
        response = web.json_response({"error": error}, status=status)
        response.force_close()
        return response


class ConnectionGuard:
    """Admits connections up to the caps and knows which of them is handling a request."""

    def __init__(
        self,
        server: web.Server,
        header_timeout_s: float,
        max_connections: int,
        record: Recorder,
        max_connections_per_client: int | None = None,
    ) -> None:
        self.server = server
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client or max_connections
        self.record = record
        self.connections: dict[RequestHandler, GuardedConnection] = {}
        self.per_client: dict[str, int] = {}
        self._full = False
        # Every request handler aiohttp makes from now on runs through this wrapper.
        self._handler = server.request_handler
        server.request_handler = self._handle

    def connection(self) -> GuardedConnection:
        """The protocol factory for `loop.create_server`."""
        return GuardedConnection(self)

    def admit(self, connection: GuardedConnection, client: str) -> RequestHandler | bytes:
        """aiohttp's protocol for a new connection from `client`, or the refusal to
        send over a cap."""
        if len(self.connections) >= self.max_connections:
            if not self._full:
                logger.warning("%d connections open: refusing more", self.max_connections)
            self._full = True
            self.record(503, "too_many_connections")
            return TOO_MANY_CONNECTIONS
        if self.per_client.get(client, 0) >= self.max_connections_per_client:
            MALFORMED.warning(
                "%s holds %d connections: refusing more from it",
                client,
                self.max_connections_per_client,
            )
            self.record(429, "too_many_client_connections")
            return TOO_MANY_CLIENT_CONNECTIONS
        self._full = False
        protocol = self.server()
        # The same object with OpenAI's envelope for aiohttp's own refusals (the
        # subclass adds no state, so the swap is sound).
        protocol.__class__ = EnvelopeRequestHandler
        self.connections[protocol] = connection
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return protocol

    def release(self, protocol: RequestHandler, client: str) -> None:
        del self.connections[protocol]
        left = self.per_client[client] - 1
        if left:
            self.per_client[client] = left
        else:
            del self.per_client[client]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = self.connections.get(request.protocol)
        if connection is None:  # lost while aiohttp started the handler
            return await self._handler(request)
        connection.request_started()
        try:
            return await self._handler(request)
        finally:
            connection.request_finished(request.content)


class GuardedConnection(asyncio.Protocol):
    """One connection: aiohttp's protocol behind a header deadline."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._protocol: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._handling = False
        # The body of the last request while aiohttp still receives it after the
        # handler (it reads and drops what the handler left unread).
        self._unread: StreamReader | None = None
        self._client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        admitted = self._guard.admit(self, self._client)
        if isinstance(admitted, bytes):
            self._close(admitted)
            return
        self._protocol = admitted
        self._arm()
        self._protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._protocol is None:
            return
        if self._unread is not None and self._unread.is_eof():
            self._unread = None
        if self._deadline is None and not self._handling and self._unread is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self._protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self._protocol.eof_received() if self._protocol is not None else None

    def pause_writing(self) -> None:
        if self._protocol is not None:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._protocol is not None:
            self._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._protocol is not None:
            self._guard.release(self._protocol, self._client)
            self._protocol.connection_lost(exc)

    def request_started(self) -> None:
        """A request's headers are in: its handler starts."""
        self._handling = True
        self._disarm()

    def request_finished(self, body: StreamReader) -> None:
        self._handling = False
        self._unread = None if body.is_eof() else body

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        self._guard.record(408, "header_timeout")
        self._close(HEADER_TIMEOUT)

    def _close(self, reply: bytes) -> None:
        """Send `reply` and close. Nothing else is being written (no request was
        parsed), so it fits the socket buffer; should it not, the connection is
        aborted rather than left open for a client that never reads."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections go through a `ConnectionGuard`."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.connection, self._host, self._port, backlog=self._backlog
        )
