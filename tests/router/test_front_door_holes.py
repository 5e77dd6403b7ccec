"""The front door's smaller holes, over real sockets: a huge batch is refused by name
while /health answers, undecodable bodies and bad framing are 400s in OpenAI's
envelope, request ids are bounded text, `expose_routing: false` hides cached tokens,
one client cannot take every connection, and KVRouteClient waits out a busy router."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvroute.replicas.api import InvalidRequestError
from kvroute.router.app.client import KVRouteClient, KVRouteError
from kvroute.router.openai.api import FrontDoor, UnitOutput
from kvroute.router.openai.guard import MALFORMED
from kvroute.router.openai.http import HttpOptions, build_app, serve_http
from kvroute.router.openai.protocol import parse_completions
from tests.router.test_http_guard import _attempt, _connect, _response
from tests.router.test_http_hardening import RefusingBackend, _send

DEADLINE_S = 10.0


def test_a_200000_prompt_batch_is_refused_by_name_while_health_answers() -> None:
    raw = json.dumps({"prompt": ["hi"] * 200_000, "max_tokens": 1}).encode()

    async def scenario() -> tuple[int, Any, list[int]]:
        app = build_app(RefusingBackend())  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            big = asyncio.ensure_future(client.post("/v1/completions", data=raw))
            health: list[int] = []
            while not big.done():
                reply = await asyncio.wait_for(client.get("/health/live"), DEADLINE_S)
                health.append(reply.status)
                await asyncio.sleep(0.01)
            response = await big
            return response.status, await response.json(), health

    status, reply, health = asyncio.run(scenario())
    assert (status, reply["error"]["param"]) == (400, "prompt")
    assert reply["error"]["message"] == (
        "`prompt` takes at most 256 prompts in one request, got 200000"
    )
    assert health and set(health) == {200}


def test_the_prompt_cap_is_the_configured_one() -> None:
    parse_completions({"prompt": ["a", "b"]}, max_prompts=2)
    with pytest.raises(InvalidRequestError, match="at most 1 prompts") as refused:
        parse_completions({"prompt": ["a", "b"]}, max_prompts=1)
    assert refused.value.param == "prompt"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_garbage_compressed_body_is_a_400(encoding: str) -> None:
    status, reply = asyncio.run(_send(b"not compressed at all", {"Content-Encoding": encoding}))
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert "Content-Encoding" in reply["error"]["message"]


def test_bad_framing_gets_openais_envelope_and_one_quiet_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(port: int) -> list[tuple[int, bytes]]:
        replies = []
        for _ in range(3):
            reader, writer = await _connect(port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            replies.append(await _response(reader))
            writer.close()
        return replies

    async def main() -> list[tuple[int, bytes]]:
        runner = await serve_http(RefusingBackend(), "127.0.0.1", 0)  # type: ignore[arg-type]
        try:
            return await scenario(runner.addresses[0][1])
        finally:
            await runner.cleanup()

    MALFORMED._next = 0.0
    with caplog.at_level(logging.DEBUG):
        replies = asyncio.run(main())
    for status, body in replies:
        assert status == 400
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
    malformed = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(malformed) == 1
    assert malformed[0].levelno == logging.WARNING and malformed[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(
    "request_id",
    ["x" * 257, "\ud800"],
    ids=["too-long", "lone-surrogate"],
)
def test_a_request_id_must_be_short_valid_text(request_id: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_completions({"prompt": "x", "request_id": request_id})
    assert refused.value.param == "request_id"


def test_a_huge_request_id_header_is_not_echoed() -> None:
    async def scenario() -> str:
        app = build_app(RefusingBackend())  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            reply = await client.get("/health/live", headers={"X-Request-Id": "y" * 5000})
            return reply.headers["X-Request-Id"]

    echoed = asyncio.run(scenario())
    assert len(echoed) == 32 and "y" not in echoed


@pytest.mark.parametrize("expose", [True, False])
def test_cached_tokens_are_shown_only_with_expose_routing(expose: bool) -> None:
    front = FrontDoor(RefusingBackend(), "fp", expose_routing=expose)  # type: ignore[arg-type]
    out = UnitOutput(index=0, prompt_index=0, prompt_tokens=320, cached_tokens=320)
    usage = front.usage([out])
    assert ("prompt_tokens_details" in usage) is expose
    if expose:
        assert usage["prompt_tokens_details"] == {"cached_tokens": 320}


def test_one_client_address_cannot_hold_every_connection() -> None:
    async def main() -> tuple[list[int | None], int | None]:
        runner = await serve_http(
            RefusingBackend(),  # type: ignore[arg-type]
            "127.0.0.1",
            0,
            HttpOptions(max_connections=10, max_connections_per_client=2),
        )
        port = runner.addresses[0][1]
        try:
            held = [await _connect(port) for _ in range(2)]
            refused = await _attempt(port)
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.2)
            return [refused], await _attempt(port)
        finally:
            await runner.cleanup()

    refused, later = asyncio.run(main())
    assert refused == [429]
    assert later == 200


def test_the_client_retries_busy_answers_within_its_deadline_honouring_retry_after() -> None:
    """A router that is busy twice (429 with Retry-After, then 503) and then answers."""
    answers = [429, 503, 200]

    async def completions(request: web.Request) -> web.Response:
        status = answers.pop(0)
        if status != 200:
            error = {"error": {"message": "busy", "type": "rate_limit_error"}}
            return web.json_response(error, status=status, headers={"Retry-After": "0"})
        return web.json_response({"choices": [{"text": "ok"}]})

    async def scenario(timeout_s: float) -> dict[str, Any]:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        async with TestServer(app) as server:
            client = KVRouteClient(str(server.make_url("")), timeout_s=timeout_s)
            return await client.agenerate("x", 1)

    assert asyncio.run(scenario(DEADLINE_S)) == {"choices": [{"text": "ok"}]}
    assert answers == []
    answers[:] = [429, 429, 200]
    with pytest.raises(KVRouteError) as refused:
        asyncio.run(scenario(0.05))  # no time to wait out the backoff
    assert refused.value.status == 429
