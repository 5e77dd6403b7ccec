"""The router's HTTP face: OpenAI-style completions, Prometheus metrics, health.

Every bad input is a 400 whose message names the problem; no live replica is a
503. A failing request never disturbs the others: each is its own task.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from replicas.api import InvalidRequestError, StreamChunk
from router.core import NoReplicaError
from router.protocol import CompletionBackend, CompletionInput, RoutedResult, parse_completion


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)


def build_app(service: CompletionBackend) -> web.Application:
    async def completions(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON", "invalid_request_error")
        try:
            parsed = parse_completion(body)
            if parsed.stream:
                return await stream_completion(request, parsed)
            routed = await service.generate(parsed)
        except InvalidRequestError as exc:
            return _error(400, str(exc), "invalid_request_error")
        except NoReplicaError as exc:
            return _error(503, str(exc), "service_unavailable")
        return web.json_response(completion_body(routed))

    def completion_body(routed: RoutedResult) -> dict[str, Any]:
        result = routed.result
        completion_tokens = len(result.output_token_ids)
        return {
            "id": result.request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": service.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": routed.text,
                    "token_ids": result.output_token_ids,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.num_prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": result.num_prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": result.num_cached_tokens},
            },
            "kvroute": {
                "replica_id": result.replica_id,
                "predicted_hit_tokens": routed.predicted_hit_tokens,
                "reuse_hint_tokens": routed.reuse_hint_tokens,
                "routing_s": routed.routing_s,
                "queue_s": result.queue_s,
                "ttft_s": result.ttft_s,
                "latency_s": result.latency_s,
                "attempts": routed.attempts,
            },
        }

    async def stream_completion(
        request: web.Request, parsed: CompletionInput
    ) -> web.StreamResponse:
        """Server-sent events: one chunk per engine step with its new tokens, a
        final chunk with finish_reason, usage and routing details, then [DONE].
        Errors raised before the first chunk become ordinary 400/503 replies."""
        async with contextlib.aclosing(service.generate_stream(parsed)) as items:
            first = await anext(items)
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            item: StreamChunk | RoutedResult | None = first
            while item is not None:
                if isinstance(item, StreamChunk):
                    chunk = {
                        "id": item.request_id,
                        "object": "text_completion",
                        "model": service.model_name,
                        "choices": [
                            {
                                "index": 0,
                                "text": service.decode(item.new_token_ids),
                                "token_ids": item.new_token_ids,
                                "finish_reason": None,
                            }
                        ],
                    }
                else:
                    chunk = completion_body(item)
                    chunk["choices"][0]["text"] = ""
                    chunk["choices"][0]["token_ids"] = []
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                try:
                    item = await anext(items, None)
                except NoReplicaError as exc:
                    error = {"error": {"message": str(exc), "type": "service_unavailable"}}
                    await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                    break
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=service.render_metrics())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def health(request: web.Request) -> web.Response:
        live = service.live_replicas()
        return web.json_response(
            {"status": "ok" if live else "no_replicas", "replicas": live},
            status=200 if live else 503,
        )

    async def status(request: web.Request) -> web.Response:
        return web.json_response(service.status())

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(
        [
            web.post("/v1/completions", completions),
            web.get("/metrics", metrics),
            web.get("/health", health),
            web.get("/status", status),
        ]
    )
    return app


async def start_http_server(service: CompletionBackend, host: str, port: int) -> str:
    """Serve on host:port (port 0 picks a free one); returns the base URL."""
    runner = web.AppRunner(build_app(service), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []
    bound_port = sockets[0].getsockname()[1] if sockets else port
    return f"http://{host}:{bound_port}"
