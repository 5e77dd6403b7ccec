"""The front door under hostile input: never a 500, limits while reading, API keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.replicas.api import InvalidRequestError
from kvroute.router.openai.http import HttpOptions, build_app
from kvroute.router.openai.protocol import parse_chat, parse_completions


class RefusingBackend:
    """Answers health; must not be asked to generate: every body here is refused first."""

    model_name = "tiny"

    def __init__(self) -> None:
        self.responses: list[tuple[str, int, str | None]] = []

    def record_response(self, endpoint: str, status: int, kind: str | None) -> None:
        self.responses.append((endpoint, status, kind))

    def live_replicas(self) -> int:
        return 1

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the backend was asked for {name!r}")


async def _send(
    raw: bytes, headers: dict[str, str] | None = None, options: HttpOptions | None = None
) -> tuple[int, Any]:
    app = build_app(RefusingBackend(), options)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/v1/completions", data=raw, headers=headers or {})
        return response.status, await response.json()


MALFORMED = {
    "lone-surrogate-prompt": b'{"prompt": "\\ud800", "max_tokens": 1}',
    "lone-surrogate-stop": b'{"prompt": "x", "stop": ["\\udfff"]}',
    "5000-digit-int": b'{"prompt": [' + b"9" * 5000 + b"]}",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "invalid-utf8": b'{"prompt": "\xff\xfe"}',
    "nan": b'{"prompt": "x", "temperature": NaN}',
    "huge-float": b'{"prompt": "x", "top_p": 1e999}',
    "empty": b"",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_bodies_are_400s_not_500s(raw: bytes) -> None:
    status, reply = asyncio.run(_send(raw))
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"


def test_a_bogus_charset_is_ignored_because_json_is_utf8() -> None:
    headers = {"Content-Type": "application/json; charset=bogus"}
    status, reply = asyncio.run(_send(b'{"prompt": 5}', headers))
    assert (status, reply["error"]["param"]) == (400, "prompt")


def test_a_body_over_the_limit_is_refused_while_it_is_read() -> None:
    raw = json.dumps({"prompt": "x" * 2000}).encode()
    status, reply = asyncio.run(_send(raw, options=HttpOptions(max_body_bytes=1000)))
    assert status == 413
    assert reply["error"]["message"].startswith("Request Entity Too Large")


def test_a_slow_upload_does_not_hold_up_health() -> None:
    """/health is answered while another client is still sending its body."""

    async def scenario() -> list[str]:
        order: list[str] = []
        app = build_app(RefusingBackend())  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            health_done = asyncio.Event()

            async def slow_body() -> AsyncIterator[bytes]:
                yield b'{"prompt": "'
                await asyncio.wait_for(health_done.wait(), 10)
                order.append("body finished")
                yield b'x", "max_tokens": "bad"}'

            upload = asyncio.ensure_future(client.post("/v1/completions", data=slow_body()))
            health = await client.get("/health")
            order.append(f"health {health.status}")
            health_done.set()
            assert (await upload).status == 400
        return order

    assert asyncio.run(scenario()) == ["health 200", "body finished"]


def test_api_keys_guard_v1_routes_in_constant_time_comparison() -> None:
    options = HttpOptions(api_keys=frozenset({"sk-right"}))
    body = b'{"prompt": 5}'
    missing, reply = asyncio.run(_send(body, options=options))
    wrong, _ = asyncio.run(_send(body, {"Authorization": "Bearer sk-wrong"}, options))
    right, _ = asyncio.run(_send(body, {"Authorization": "Bearer sk-right"}, options))
    assert (missing, wrong, right) == (401, 401, 400)
    assert reply["error"]["code"] == "invalid_api_key"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "prompt",
        "messages",
        "max_tokens",
        "n",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stream",
        "stream_options",
        "echo",
        "model",
        "logprobs",
        "stop_token_ids",
        "timeout",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(fields, json_values, max_size=6))
def test_parsing_any_json_either_succeeds_or_names_the_problem(body: dict[str, Any]) -> None:
    for parse in (parse_completions, parse_chat):
        try:
            parse(body)
        except InvalidRequestError as exc:
            assert str(exc)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_never_a_server_error(raw: bytes) -> None:
    status, reply = asyncio.run(_send(raw))
    assert status == 400 and "error" in reply


@pytest.mark.parametrize(
    ("path", "minimum", "status", "state"),
    [
        ("/health/live", 5, 200, "ok"),
        ("/health/ready", 1, 200, "ok"),
        ("/health/ready", 2, 503, "not_ready"),
        ("/health", 2, 503, "not_ready"),
    ],
)
def test_liveness_and_readiness_are_separate(
    path: str, minimum: int, status: int, state: str
) -> None:
    async def get() -> tuple[int, Any]:
        app = build_app(RefusingBackend(), HttpOptions(min_ready_replicas=minimum))  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            response = await client.get(path)
            return response.status, await response.json()

    got, body = asyncio.run(get())
    assert (got, body["status"]) == (status, state)
