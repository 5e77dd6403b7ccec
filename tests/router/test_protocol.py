"""HTTP request parsing: every field of a /v1/completions body and each wrong type."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from replicas.api import InvalidRequestError
from router.http import build_app
from router.protocol import CompletionInput, parse_completion


def test_a_text_prompt_with_no_other_fields_gets_the_defaults() -> None:
    assert parse_completion({"prompt": "Hello"}) == CompletionInput(
        text="Hello",
        token_ids=None,
        max_tokens=16,
        lora_name=None,
        cache_salt=None,
        request_id=None,
        stream=False,
    )


def test_every_field_is_carried_over() -> None:
    body = {
        "prompt": [1, 2, 3],
        "max_tokens": 8,
        "lora_name": "adapter",
        "cache_salt": "tenant-1",
        "request_id": "req-7",
        "stream": True,
    }
    assert parse_completion(body) == CompletionInput(
        text=None,
        token_ids=[1, 2, 3],
        max_tokens=8,
        lora_name="adapter",
        cache_salt="tenant-1",
        request_id="req-7",
        stream=True,
    )


def test_null_optional_strings_mean_not_given() -> None:
    body = {"prompt": "x", "lora_name": None, "cache_salt": None, "request_id": None}
    parsed = parse_completion(body)
    assert (parsed.lora_name, parsed.cache_salt, parsed.request_id) == (None, None, None)


def test_unknown_fields_are_ignored() -> None:
    assert parse_completion({"prompt": "x", "temperature": 0.7, "n": 1}) == CompletionInput(
        text="x"
    )


@pytest.mark.parametrize(
    ("prompt", "text", "token_ids"),
    [
        ("", "", None),
        ([], None, []),
        (["one text"], "one text", None),
        ([[4, 5]], None, [4, 5]),
    ],
    ids=["empty-text", "empty-ids", "batch-of-one-text", "batch-of-one-ids"],
)
def test_prompt_forms(prompt: Any, text: str | None, token_ids: list[int] | None) -> None:
    parsed = parse_completion({"prompt": prompt, "max_tokens": 3})
    assert (parsed.text, parsed.token_ids, parsed.max_tokens) == (text, token_ids, 3)


def test_a_batch_of_one_keeps_the_other_fields() -> None:
    parsed = parse_completion({"prompt": [[9]], "max_tokens": 2, "cache_salt": "s", "stream": True})
    assert parsed == CompletionInput(token_ids=[9], max_tokens=2, cache_salt="s", stream=True)


@pytest.mark.parametrize("body", [None, [], "prompt", 3, True], ids=repr)
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"^the request body must be a JSON object$"):
        parse_completion(body)


@pytest.mark.parametrize(
    "prompt",
    [
        None,
        7,
        2.5,
        True,
        {"text": "x"},
        [1, "2"],
        [1, 2.0],
        [True, 1],
        [1, None],
        ["a", "b"],
        [[1], [2]],
        [[1, "x"]],
        [None],
        [{"text": "x"}],
    ],
    ids=repr,
)
def test_a_prompt_that_is_neither_text_nor_token_ids_is_refused(prompt: Any) -> None:
    with pytest.raises(
        InvalidRequestError, match=r"^`prompt` must be a string or a list of token ids$"
    ):
        parse_completion({"prompt": prompt})


def test_a_missing_prompt_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"^`prompt` must be a string"):
        parse_completion({"max_tokens": 4})


@pytest.mark.parametrize("max_tokens", ["8", 2.5, 8.0, True, False, None, [8], {"n": 8}], ids=repr)
def test_max_tokens_of_the_wrong_type_is_refused(max_tokens: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"^`max_tokens` must be an integer$"):
        parse_completion({"prompt": "x", "max_tokens": max_tokens})


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_max_tokens_below_one_is_refused(max_tokens: int) -> None:
    with pytest.raises(InvalidRequestError, match=r"^max_tokens must be at least 1$"):
        parse_completion({"prompt": "x", "max_tokens": max_tokens})


def test_max_tokens_of_one_is_accepted() -> None:
    assert parse_completion({"prompt": "x", "max_tokens": 1}).max_tokens == 1


@pytest.mark.parametrize("key", ["lora_name", "cache_salt", "request_id"])
@pytest.mark.parametrize("value", [1, 2.5, True, ["a"], {"a": 1}], ids=repr)
def test_an_optional_string_field_of_another_type_is_refused(key: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=f"^`{key}` must be a string$"):
        parse_completion({"prompt": "x", key: value})


@pytest.mark.parametrize("stream", ["true", 1, 0, None, [True]], ids=repr)
def test_stream_that_is_not_a_boolean_is_refused(stream: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"^`stream` must be true or false$"):
        parse_completion({"prompt": "x", "stream": stream})


def test_stream_false_is_accepted() -> None:
    assert parse_completion({"prompt": "x", "stream": False}).stream is False


class _NoService:
    """A service that must not be reached: every body here is refused first."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the service was asked for {name!r}")


async def _post(raw: bytes) -> tuple[int, Any]:
    async with TestClient(TestServer(build_app(_NoService()))) as client:  # type: ignore[arg-type]
        response = await client.post("/v1/completions", data=raw)
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "max_tokens": "8"}, "`max_tokens` must be an integer"),
        ({"prompt": "x", "max_tokens": 2.5}, "`max_tokens` must be an integer"),
        ({"prompt": "x", "max_tokens": True}, "`max_tokens` must be an integer"),
        ({"prompt": 5}, "`prompt` must be a string or a list of token ids"),
        ({"prompt": "x", "stream": "yes"}, "`stream` must be true or false"),
        ([1, 2], "the request body must be a JSON object"),
    ],
    ids=["max_tokens-str", "max_tokens-float", "max_tokens-bool", "prompt", "stream", "array"],
)
def test_the_http_endpoint_answers_a_bad_field_with_a_400_naming_it(
    body: Any, message: str
) -> None:
    status, reply = asyncio.run(_post(json.dumps(body).encode()))
    assert (status, reply) == (
        400,
        {"error": {"message": message, "type": "invalid_request_error"}},
    )


def test_the_http_endpoint_answers_a_body_that_is_not_json_with_a_400() -> None:
    status, reply = asyncio.run(_post(b"{not json"))
    assert (status, reply) == (
        400,
        {
            "error": {
                "message": "the request body is not valid JSON",
                "type": "invalid_request_error",
            }
        },
    )
