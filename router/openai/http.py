"""The router's HTTP face: OpenAI-compatible completions, chat and models; metrics; health.

Every error, unknown routes included, is OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`: a bad field is a 400 naming it,
an unknown model a 404, no live replica a 503. Messages never carry internals
(tracebacks, addresses, actor ids): an unexpected failure is logged here with its
request id and answered with a plain 500. Each response echoes `X-Request-Id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from kvroute.replicas.api import InvalidRequestError, RequestFailedError
from kvroute.router.core import NoReplicaError, ReplicasBusyError, RequestTimeoutError
from kvroute.router.openai.api import FrontDoor
from kvroute.router.openai.guard import ConnectionGuard, GuardedSite
from kvroute.router.openai.protocol import (
    CompletionRouter,
    ModelNotFoundError,
    parse_chat,
    parse_completions,
)

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# Bodies above this are parsed on a worker thread, so one large body never stalls
# the event loop that serves every other request.
INLINE_PARSE_BYTES = 64 * 1024
# Conversations longer than this (characters) are rendered and tokenized on a worker
# thread, for the same reason.
INLINE_CHAT_CHARS = 16 * 1024
# A client's X-Request-Id is echoed only if it is this short (else a fresh one is used).
MAX_REQUEST_ID_HEADER = 256
REQUEST_ID = web.RequestKey("request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
Recorder = Callable[[str, int, "str | None"], None]


class UnauthorizedError(Exception):
    """A request without a valid API key (HTTP 401)."""


def error_body(
    message: str, kind: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> web.Response:
    return web.json_response(error_body(message, kind, param, code), status=status)


def _known_error(exc: Exception) -> tuple[web.Response, str] | None:
    """The reply to an error a request can cause, with its kind for the metrics; None
    for an internal failure."""
    if isinstance(exc, UnauthorizedError):
        message = "Incorrect API key provided: send it as 'Authorization: Bearer <key>'"
        reply = error_response(401, message, "invalid_request_error", None, "invalid_api_key")
        return reply, "unauthorized"
    if isinstance(exc, ModelNotFoundError):
        reply = error_response(404, str(exc), "invalid_request_error", "model", "model_not_found")
        return reply, "model_not_found"
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc), "invalid_request_error", exc.param), "invalid_request"
    if isinstance(exc, ReplicasBusyError):
        reply = error_response(429, str(exc), "rate_limit_error", None, "replicas_busy")
        reply.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return reply, "overloaded"
    if isinstance(exc, RequestTimeoutError):
        return error_response(504, str(exc), "timeout_error", None, "request_timeout"), "timeout"
    if isinstance(exc, NoReplicaError):
        reply = error_response(503, str(exc), "service_unavailable", None, "no_replica")
        return reply, "no_replica"
    if isinstance(exc, RequestFailedError):
        # The engine failed this one request and serves on; its cause is in its log.
        reply = error_response(500, str(exc), "server_error", None, "request_failed")
        return reply, "request_failed"
    return None


def _endpoint(request: web.Request) -> str:
    """The route's path pattern (bounded label values), or `unmatched`."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def error_middleware(record: Recorder) -> Middleware:
    """Request ids in and out, OpenAI's error envelope for every failure, and each
    response counted by endpoint, status and error kind."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if not request_id or len(request_id) > MAX_REQUEST_ID_HEADER:
            request_id = uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        kind: str | None = None
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            kind = "route" if exc.status in (404, 405) else "http"
            error_kind = "invalid_request_error" if exc.status < 500 else "server_error"
            message = "no such route" if exc.status == 404 else exc.reason
            response = error_response(
                exc.status, f"{message}: {request.method} {request.path}", error_kind
            )
        except Exception as exc:
            known = _known_error(exc)
            if known is None:
                logger.exception("request %s failed", request_id)
                known = error_response(500, "internal error", "server_error"), "internal"
            response, kind = known
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        record(_endpoint(request), response.status, kind)
        return response

    return middleware


@dataclass(frozen=True)
class HttpOptions:
    """The front door's limits and policies (from `router.*` in the config)."""

    fingerprint: str = "kvroute"
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    # Bearer keys accepted on /v1/*; empty: no authentication.
    api_keys: frozenset[str] = frozenset()
    # The `kvroute` section (replica, predicted hit): a cache-probing side channel
    # for unsalted prompts, so it can be left out for untrusted clients.
    expose_routing: bool = True
    min_ready_replicas: int = 1
    # Against slow and numerous clients (router.http_guard): a request's headers must
    # be in within header_timeout_s; past max_connections open, new ones get a 503.
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    # An idle kept-alive connection is closed after this (aiohttp's default is an
    # hour), so idle clients cannot hold the connection cap.
    keepalive_timeout_s: float = 75.0
    max_connections_per_client: int = 256
    # A completions batch of more prompts is a 400 naming `prompt`, before dispatch.
    max_prompts_per_request: int = 256


def decode_json(raw: bytes) -> Any:
    """JSON is UTF-8 (RFC 8259) whatever charset a client claims; anything that is
    not a JSON document, too deep or holding a number too long to convert, is a 400."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InvalidRequestError("the request body is not valid JSON") from None


async def _json(request: web.Request, options: HttpOptions) -> Any:
    """The body, read within `body_timeout_s` (the size limit applies while reading)
    and parsed off the event loop when large."""
    try:
        async with asyncio.timeout(options.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise InvalidRequestError(
            f"the request body did not arrive within {options.body_timeout_s:g} s"
        ) from None
    except RequestPayloadError:
        # Most often a body that its Content-Encoding (gzip, deflate) cannot decode.
        raise InvalidRequestError(
            "the request body could not be read: is its Content-Encoding right?"
        ) from None
    if len(raw) <= INLINE_PARSE_BYTES:
        return decode_json(raw)
    return await asyncio.to_thread(decode_json, raw)


def _authorized(request: web.Request, keys: frozenset[str]) -> bool:
    """A Bearer key, compared with every accepted key in constant time."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    return any(hmac.compare_digest(given, key.encode()) for key in keys)


def api_key_middleware(keys: frozenset[str]) -> Middleware:
    """OpenAI's 401 for a missing or wrong key on /v1/* and /status (which names
    replicas and nodes); health and metrics stay open for probes and scrapers."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        guarded = request.path.startswith("/v1/") or request.path == "/status"
        if guarded and not _authorized(request, keys):
            raise UnauthorizedError
        return await handler(request)

    return middleware


class _EventStream(web.StreamResponse):
    """An SSE response whose headers go out with its first event, in one send: the
    first event is already in hand when the response starts (aiohttp's StreamResponse
    sends them alone at `prepare`, a syscall per streamed request for nothing)."""

    _send_headers_immediately = False


async def _sse(request: web.Request, chunks: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Server-sent events. The first chunk is awaited before the response starts, so an
    error before any output is an ordinary error reply; a later one is an error event."""
    async with contextlib.aclosing(chunks):
        first = await anext(chunks)
        response = _EventStream(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                REQUEST_ID_HEADER: request[REQUEST_ID],
            }
        )
        await response.prepare(request)
        chunk: dict[str, Any] | None = first
        while chunk is not None:
            await response.write(b"data: " + _encode_event(chunk) + b"\n\n")
            try:
                chunk = await anext(chunks, None)
            except Exception as exc:
                error = _encode_event(_stream_error(request, exc))
                await response.write(b"data: " + error + b"\n\n")
                break
        await response.write_eof(b"data: [DONE]\n\n")  # with the body's end: one send
    return response


# One encoder for every event: msgspec writes UTF-8 JSON several times faster than
# json.dumps, and an event is encoded per streamed token.
_encode_event = msgspec.json.Encoder().encode


def _stream_error(request: web.Request, exc: Exception) -> dict[str, Any]:
    """The error event that ends a stream already under way."""
    known = _known_error(exc)
    if known is None or known[0].text is None:
        logger.exception("stream %s failed", request[REQUEST_ID], exc_info=exc)
        return error_body("internal error", "server_error")
    return json.loads(known[0].text)


def build_app(service: CompletionRouter, options: HttpOptions | None = None) -> web.Application:
    options = options or HttpOptions()
    front = FrontDoor(service, options.fingerprint, options.expose_routing)

    async def completions(request: web.Request) -> web.StreamResponse:
        call = parse_completions(await _json(request, options), options.max_prompts_per_request)
        units = front.completions_units(call)
        if call.params.stream:
            return await _sse(request, front.completion_chunks(call, units))
        outputs = await front.collect(units)
        return web.json_response(front.completion_body(call, units, outputs))

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        call = parse_chat(await _json(request, options))
        if sum(len(m["content"]) for m in call.messages) <= INLINE_CHAT_CHARS:
            units = front.chat_units(call)
        else:
            units = await asyncio.to_thread(front.chat_units, call)
        if call.params.stream:
            return await _sse(request, front.chat_chunks(call, units))
        outputs = await front.collect(units)
        return web.json_response(front.chat_body(call, outputs))

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": service.models()})

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=service.render_metrics())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(request: web.Request) -> web.Response:
        """Ready when at least `min_ready_replicas` replicas serve; 503 with the counts
        otherwise, so a load balancer stops sending here."""
        live_replicas = service.live_replicas()
        ok = live_replicas >= options.min_ready_replicas
        return web.json_response(
            {
                "status": "ok" if ok else "not_ready",
                "replicas": live_replicas,
                "min_ready_replicas": options.min_ready_replicas,
            },
            status=200 if ok else 503,
        )

    async def status(request: web.Request) -> web.Response:
        return web.json_response(service.status())

    middlewares = [error_middleware(service.record_response)]
    if options.api_keys:
        middlewares.append(api_key_middleware(options.api_keys))
    app = web.Application(client_max_size=options.max_body_bytes, middlewares=middlewares)
    app.add_routes(
        [
            web.post("/v1/completions", completions),
            web.post("/v1/chat/completions", chat_completions),
            web.get("/v1/models", models),
            web.get("/metrics", metrics),
            web.get("/health", ready),
            web.get("/health/ready", ready),
            web.get("/health/live", live),
            web.get("/status", status),
        ]
    )
    return app


async def serve_http(
    service: CompletionRouter, host: str, port: int, options: HttpOptions | None = None
) -> web.AppRunner:
    """Serve on host:port (port 0 picks a free one) behind a header deadline and a
    connection cap. `addresses` has the bound port; `cleanup()` stops serving."""
    options = options or HttpOptions()
    # handler_cancellation: a client that disconnects cancels its handler at once, so
    # its request is aborted on the replica even while it waits for a full response.
    runner = web.AppRunner(
        build_app(service, options),
        access_log=None,
        handler_cancellation=True,
        keepalive_timeout=options.keepalive_timeout_s,
    )
    await runner.setup()
    assert runner.server is not None

    def record(status: int, kind: str) -> None:
        service.record_response("unmatched", status, kind)

    guard = ConnectionGuard(
        runner.server,
        options.header_timeout_s,
        options.max_connections,
        record,
        options.max_connections_per_client,
    )
    await GuardedSite(runner, host, port, guard).start()
    return runner


async def start_http_server(
    service: CompletionRouter, host: str, port: int, options: HttpOptions | None = None
) -> tuple[str, web.AppRunner]:
    """Serve on host:port (port 0 picks a free one); returns the base URL and the
    runner, whose `cleanup()` stops serving."""
    runner = await serve_http(service, host, port, options)
    return f"http://{host}:{runner.addresses[0][1]}", runner
