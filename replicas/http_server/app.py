"""One replica's own HTTP server, shaped as vLLM's OpenAI server (`kvroute serve-replica`).

A router written for vLLM can proxy to it unchanged: the bodies, stream chunks,
errors and metric names are vLLM's (`replica_responses`, `replica_metrics`).
Requests go straight to one engine through a `ServedEngine`
(`replicas.serving.ReplicaCore`) by `replica_generation`; there is no routing here.

This module is the aiohttp app: routes, vLLM's errors, server-sent events.
- errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP
  status as `code`: 400 `BadRequestError`, 404 `NotFoundError` (an unknown model
  or route), 413, 500 `InternalServerError`;
- every stream event is `data: {json}\\n\\n`, the last `data: [DONE]\\n\\n`.

A client that disconnects cancels its handler (aiohttp's `handler_cancellation`),
which closes the engine stream and aborts the request: its blocks are freed
before the next step.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvroute.replicas.api import (
    EngineDeadError,
    InvalidRequestError,
    RequestAbortedError,
    RequestFailedError,
)
from kvroute.replicas.http_server.backend import ServedEngine, ServedModel
from kvroute.replicas.http_server.generation import ReplicaCall, ReplicaGenerator
from kvroute.replicas.http_server.metrics import ReplicaCollector, RequestTally
from kvroute.replicas.http_server.responses import ReplicaFrontend, rendered
from kvroute.router.openai.chat import ChatTemplate
from kvroute.router.openai.http import Handler, decode_json, error_body
from kvroute.router.openai.protocol import ModelNotFoundError, parse_chat, parse_completions
from kvroute.router.openai.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Parsed = TypeVar("Parsed")  # a parsed request body: `CompletionsCall` or `ChatCall`

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    503: "ServiceUnavailableError",
}


def _status_error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return web.json_response(error_body(message, kind, param, status), status=status)


def _reply_to(exc: Exception) -> web.Response | None:
    """vLLM's error reply to what a request can cause; None for an internal failure."""
    if isinstance(exc, ModelNotFoundError):
        return _status_error(404, str(exc), "model")
    if isinstance(exc, InvalidRequestError):
        return _status_error(400, str(exc), exc.param)
    if isinstance(exc, RequestAbortedError):  # the server is shutting down
        return _status_error(503, "the server is shutting down")
    if isinstance(exc, EngineDeadError):  # logged once, by the core
        return _status_error(503, "the engine has stopped")
    if isinstance(exc, RequestFailedError):  # its cause is logged by the core
        return _status_error(500, str(exc))
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as vLLM's error body; internals only in the log."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = "Not Found" if exc.status == 404 else exc.reason
        return _status_error(exc.status, f"{message}: {request.method} {request.path}")
    except Exception as exc:
        reply = _reply_to(exc)
        if reply is None:
            logger.exception("%s %s failed", request.method, request.path)
            reply = _status_error(500, "internal error")
        return reply


def _flag(body: Any, key: str) -> bool:
    value = body.get(key) if isinstance(body, dict) else None
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError(f"`{key}` must be true or false", key)
    return bool(value)


def _sse_line(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse(
    request: web.Request, chunks: AsyncIterator[dict[str, Any]]
) -> tuple[web.StreamResponse, bool]:
    """Server-sent events, and whether every chunk was sent; a failure once the
    stream has begun is vLLM's error event, then `[DONE]`. A client that leaves
    mid-stream is a DEBUG line, not an error."""
    async with contextlib.aclosing(chunks):
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            ok = await _stream(request, response, chunks)
        except ConnectionResetError:
            logger.debug("stream %s: the client disconnected", request.path)
            ok = False
    return response, ok


async def _stream(
    request: web.Request, response: web.StreamResponse, chunks: AsyncIterator[dict[str, Any]]
) -> bool:
    """Write every chunk, then `[DONE]`; False if a failure cut the stream short (its
    error event is written in its place). A client that left raises ConnectionResetError."""
    ok = True
    try:
        async for chunk in chunks:
            await response.write(_sse_line(chunk))
    except ConnectionResetError:
        raise
    except Exception as exc:
        ok = False
        reply = _reply_to(exc)
        if reply is None or reply.text is None:
            logger.exception("stream %s failed", request.path)
            body = error_body("internal error", "InternalServerError", None, 500)
        else:
            body = json.loads(reply.text)
        await response.write(_sse_line(body))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return ok


def build_replica_app(
    backend: ServedEngine, model: ServedModel, tokenizer: Tokenizer, template: ChatTemplate
) -> web.Application:
    generator = ReplicaGenerator(backend, model, tokenizer, template)
    front = ReplicaFrontend(generator)
    registry = CollectorRegistry(auto_describe=True)
    tally = RequestTally()
    registry.register(ReplicaCollector(backend, model, tally))

    async def body_of(request: web.Request) -> Any:
        return decode_json(await request.read())

    def generation(
        parse: Callable[[Any], Parsed],
        expand: Callable[[Parsed, bool], ReplicaCall],
        chunks: Callable[[ReplicaCall], AsyncIterator[dict[str, Any]]],
        whole: Callable[[ReplicaCall], dict[str, Any]],
    ) -> Handler:
        """A completions or chat handler: the body is parsed (its errors before the
        flags'), expanded to a call, then streamed as `chunks` or answered `whole`
        once every choice has finished."""

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await body_of(request)
            call = expand(parse(body), _flag(body, "return_token_ids"))
            if _flag(body, "stream"):
                response, ok = await _sse(request, chunks(call))
            else:
                await generator.collect(call)
                response, ok = web.json_response(whole(call)), True
            tally.success += ok
            return response

        return handler

    completions = generation(
        parse_completions,
        generator.completions_call,
        front.completion_chunks,
        front.completion_body,
    )
    chat_completions = generation(
        parse_chat, generator.chat_call, front.chat_chunks, front.chat_body
    )

    async def tokenize(request: web.Request) -> web.Response:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        generator.resolve_model(body.get("model"))
        if "messages" in body:
            tokens = generator.render_chat(parse_chat({"messages": body["messages"]}).messages)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise InvalidRequestError("`prompt` must be a string", "prompt")
            add_special = body.get("add_special_tokens", True)
            if not isinstance(add_special, bool):
                raise InvalidRequestError("`add_special_tokens` must be true or false")
            tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        return web.json_response(
            {
                "count": len(tokens),
                "max_model_len": model.limits.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    def render(
        parse: Callable[[Any], Parsed],
        expand: Callable[[Parsed, bool], ReplicaCall],
        one: bool,
    ) -> Handler:
        """vLLM's render endpoints (`--enable-scale-out`): the request as the token
        ids and sampling parameters the engine would run, without running it; chat
        renders its one prompt as one object, completions a list."""

        async def handler(request: web.Request) -> web.Response:
            requests = rendered(expand(parse(await body_of(request)), False))
            return web.json_response(requests[0] if one else requests)

        return handler

    async def models(request: web.Request) -> web.Response:
        return web.json_response(front.models())

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if backend.serving else 503)

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        """vLLM's endpoint (dev mode there): drop the prefix cache and publish
        AllBlocksCleared; 409 while requests hold blocks."""
        if backend.reset_prefix_cache():
            return web.Response(status=200)
        return _status_error(409, "requests in flight hold blocks; the prefix cache was not reset")

    async def metrics(request: web.Request) -> web.Response:
        """The exposition; with `name[]` parameters, only those samples, as
        prometheus_client's own app (and so vLLM's `/metrics`) answers."""
        names = request.query.getall("name[]", [])
        response = web.Response(
            body=generate_latest(registry.restricted_registry(names) if names else registry)
        )
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application(client_max_size=model.max_body_bytes, middlewares=[error_middleware])
    app.add_routes(
        [
            web.post("/v1/completions", completions),
            web.post("/v1/chat/completions", chat_completions),
            web.post("/tokenize", tokenize),
            web.post(
                "/v1/completions/render",
                render(parse_completions, generator.completions_call, False),
            ),
            web.post("/v1/chat/completions/render", render(parse_chat, generator.chat_call, True)),
            web.get("/v1/models", models),
            web.get("/health", health),
            web.get("/metrics", metrics),
            web.post("/reset_prefix_cache", reset_prefix_cache),
        ]
    )
    return app
