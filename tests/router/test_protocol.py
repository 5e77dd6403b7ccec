"""OpenAI request parsing: every field of completions and chat bodies, and each wrong type."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvroute.replicas.api import InvalidRequestError, RequestFailedError, SamplingOptions
from kvroute.router.openai.http import build_app
from kvroute.router.openai.protocol import (
    CompletionInput,
    GenerationParams,
    parse_chat,
    parse_completions,
)


def single_completion(body: Any) -> CompletionInput:
    """The one dispatch unit of a single-prompt, single-choice completions body."""
    call = parse_completions(body)
    return call.params.inputs(call.prompts[0], 0, call.params.lora_name)


def test_a_text_prompt_with_no_other_fields_gets_openais_defaults() -> None:
    assert single_completion({"prompt": "Hello"}) == CompletionInput(
        text="Hello", token_ids=None, max_tokens=16, stream=False, sampling=SamplingOptions()
    )


def test_every_field_is_carried_over() -> None:
    body = {
        "model": "tiny",
        "prompt": [1, 2, 3],
        "max_tokens": 8,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 7,
        "seed": 11,
        "stop": ["END"],
        "stop_token_ids": [2],
        "ignore_eos": True,
        "lora_name": "adapter",
        "cache_salt": "tenant-1",
        "request_id": "req-7",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = parse_completions(body)
    assert call.params == GenerationParams(
        model="tiny",
        max_tokens=8,
        sampling=SamplingOptions(
            temperature=0.0, top_p=0.5, top_k=7, seed=11, stop_token_ids=(2,), ignore_eos=True
        ),
        stop=("END",),
        n=1,
        stream=True,
        include_usage=True,
        lora_name="adapter",
        cache_salt="tenant-1",
        request_id="req-7",
    )
    assert call.prompts == ([1, 2, 3],)


def test_null_optional_fields_mean_not_given() -> None:
    body = {"prompt": "x", "lora_name": None, "max_tokens": None, "stop": None, "seed": None}
    params = parse_completions(body).params
    assert (params.lora_name, params.max_tokens, params.stop, params.sampling.seed) == (
        None,
        16,
        (),
        None,
    )


def test_fields_the_server_does_not_know_are_ignored() -> None:
    assert single_completion({"prompt": "x", "user": "u1", "metadata": {"a": 1}}) == (
        CompletionInput(text="x")
    )


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("", ("",)),
        ([], ([],)),
        ([4, 5], ([4, 5],)),
        (["one", "two"], ("one", "two")),
        ([[4, 5], [6]], ([4, 5], [6])),
        (["text", [7]], ("text", [7])),
    ],
    ids=["empty-text", "empty-ids", "ids", "texts", "id-lists", "mixed"],
)
def test_prompt_forms_a_batch_or_one(prompt: Any, prompts: tuple[Any, ...]) -> None:
    assert parse_completions({"prompt": prompt}).prompts == prompts


def test_max_completion_tokens_stands_for_max_tokens_and_chat_defaults_to_the_context() -> None:
    assert parse_completions({"prompt": "x", "max_completion_tokens": 5}).params.max_tokens == 5
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat(chat).params.max_tokens is None
    assert parse_chat({**chat, "max_tokens": 3}).params.max_tokens == 3


def test_choices_of_a_seeded_request_get_consecutive_seeds() -> None:
    params = parse_completions({"prompt": "x", "n": 3, "seed": 40}).params
    assert [params.inputs("x", j, None).sampling.seed for j in range(3)] == [40, 41, 42]


def test_every_seed_the_choices_use_must_fit_a_64_bit_signed_integer() -> None:
    """Choice j samples with seed + j: seed + n - 1 must fit too."""
    top = 2**63 - 1
    assert (
        parse_completions({"prompt": "x", "n": 3, "seed": top - 2}).params.sampling.seed == top - 2
    )
    assert parse_completions({"prompt": "x", "seed": -(2**63)}).params.sampling.seed == -(2**63)
    with pytest.raises(InvalidRequestError, match=r"got 9223372036854775806 with n = 3$") as caught:
        parse_completions({"prompt": "x", "n": 3, "seed": top - 1})
    assert caught.value.param == "seed"


@pytest.mark.parametrize("body", [None, [], "prompt", 3, True], ids=repr)
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"^the request body must be a JSON object$"):
        parse_completions(body)


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
        [[1], []],
        [[1, "x"]],
        [None],
        [{"text": "x"}],
    ],
    ids=repr,
)
def test_a_prompt_that_is_neither_text_nor_token_ids_is_refused(prompt: Any) -> None:
    with pytest.raises(InvalidRequestError, match=r"^`prompt` must be a string, a list of token"):
        parse_completions({"prompt": prompt})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", "8", "`max_tokens` must be an integer"),
        ("max_tokens", 2.5, "`max_tokens` must be an integer"),
        ("max_tokens", True, "`max_tokens` must be an integer"),
        ("max_tokens", 0, "`max_tokens` must be at least 1, got 0"),
        ("n", 0, "`n` must be at least 1, got 0"),
        ("n", 17, "`n` must be at most 16, got 17"),
        ("temperature", "hot", "`temperature` must be a number"),
        ("temperature", 2.5, r"`temperature` must be in \[0, 2\], got 2.5"),
        ("top_p", 0, r"`top_p` must be in \(0, 1\], got 0"),
        ("top_k", -2, "`top_k` must be at least 0, got -2"),
        ("seed", 1.5, "`seed` must be an integer"),
        ("stop", 5, "`stop` must be a non-empty string or a list of them"),
        ("stop", ["a", ""], "`stop` must be a non-empty string or a list of them"),
        ("stop", ["a", "b", "c", "d", "e"], "`stop` takes at most 4 sequences"),
        ("stop_token_ids", [1, "2"], "`stop_token_ids` must be a list of non-negative token ids"),
        ("stop_token_ids", [1, -1], "`stop_token_ids` must be a list of non-negative token ids"),
        ("seed", 2**64, r"`seed` must be in \[-9223372036854775808, 9223372036854775807\]"),
        ("seed", -(2**63) - 1, r"`seed` must be in \[-9223372036854775808, 9223372036854775807\]"),
        ("stream", "yes", "`stream` must be true or false"),
        ("ignore_eos", 1, "`ignore_eos` must be true or false"),
        ("echo", "no", "`echo` must be true or false"),
        ("model", 3, "`model` must be a string"),
        ("cache_salt", ["a"], "`cache_salt` must be a string"),
        ("stream_options", {"include_usage": True}, "`stream_options` must be an object, and"),
        ("logprobs", 2, "`logprobs` is not supported by this server"),
        ("presence_penalty", 0.5, "`presence_penalty` is not supported by this server"),
        ("logit_bias", {"1": 5}, "`logit_bias` is not supported by this server"),
        ("suffix", "end", "`suffix` is not supported by this server"),
        ("best_of", 3, "`best_of` is not supported by this server"),
    ],
)
def test_a_bad_or_unsupported_field_is_refused_naming_it(
    field: str, value: Any, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{message}") as caught:
        parse_completions({"prompt": "x", field: value})
    assert caught.value.param == field


@pytest.mark.parametrize(
    ("field", "off"),
    [("logprobs", None), ("logprobs", 0), ("presence_penalty", 0), ("best_of", 1), ("top_k", -1)],
)
def test_a_parameter_at_its_off_value_is_accepted(field: str, off: Any) -> None:
    assert parse_completions({"prompt": "x", field: off}).prompts == ("x",)


def test_chat_messages_take_text_parts_and_refuse_everything_else() -> None:
    call = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ]
        }
    )
    assert call.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "`messages` must be a non-empty list"),
        ("hi", "`messages` must be a non-empty list"),
        (["hi"], r"`messages\[0\]` must be an object"),
        ([{"role": "king", "content": "x"}], r"`messages\[0\].role` must be"),
        ([{"role": "user", "content": 5}], r"`messages\[0\].content` must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"`messages\[0\].content` parts must be text",
        ),
    ],
)
def test_bad_chat_messages_are_refused(messages: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{message}"):
        parse_chat({"messages": messages})


class _NoService:
    """A backend that must not be reached: every request here is refused first. It
    only counts the responses, as the real one does for its metrics."""

    model_name = "tiny"

    def __init__(self) -> None:
        self.responses: list[tuple[str, int, str | None]] = []

    def record_response(self, endpoint: str, status: int, kind: str | None) -> None:
        self.responses.append((endpoint, status, kind))

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the service was asked for {name!r}")


async def _call(
    method: str, path: str, raw: bytes = b"", service: _NoService | None = None
) -> tuple[int, Any, str]:
    backend = service or _NoService()
    async with TestClient(TestServer(build_app(backend))) as client:  # type: ignore[arg-type]
        response = await client.request(method, path, data=raw)
        return response.status, await response.json(), response.headers["X-Request-Id"]


class _FailingEngineService(_NoService):
    """The engine fails every request it is given (as one poisoned request fails)."""

    def resolve_model(self, model: str | None) -> None:
        return None

    async def generate(self, unit: Any) -> Any:
        raise RequestFailedError(unit.request_id)


def test_a_request_the_engine_failed_is_a_500_naming_it_not_an_internal_error() -> None:
    service = _FailingEngineService()
    body = b'{"prompt": [1, 2, 3], "max_tokens": 2, "request_id": "poisoned"}'
    status, reply, _ = asyncio.run(_call("POST", "/v1/completions", body, service))
    assert status == 500
    assert reply == {
        "error": {
            "message": "request poisoned failed in the engine",
            "type": "server_error",
            "param": None,
            "code": "request_failed",
        }
    }
    assert service.responses == [("/v1/completions", 500, "request_failed")]


def test_every_response_is_counted_by_endpoint_status_and_error_kind() -> None:
    service = _NoService()
    asyncio.run(_call("POST", "/v1/completions", b"{}", service))
    asyncio.run(_call("POST", "/v1/chat/completions", b"[]", service))
    asyncio.run(_call("GET", "/nowhere", b"", service))
    assert service.responses == [
        ("/v1/completions", 400, "invalid_request"),
        ("/v1/chat/completions", 400, "invalid_request"),
        ("unmatched", 404, "route"),
    ]


@pytest.mark.parametrize(
    ("path", "body", "message", "param"),
    [
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": "8"},
            "`max_tokens` must be an integer",
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"prompt": 5},
            "`prompt` must be a string, a list of token ids, or a list of either",
            "prompt",
        ),
        ("/v1/completions", [1, 2], "the request body must be a JSON object", None),
        (
            "/v1/chat/completions",
            {"messages": []},
            "`messages` must be a non-empty list",
            "messages",
        ),
    ],
)
def test_the_http_endpoints_answer_a_bad_field_with_openais_400(
    path: str, body: Any, message: str, param: str | None
) -> None:
    status, reply, _ = asyncio.run(_call("POST", path, json.dumps(body).encode()))
    assert (status, reply) == (
        400,
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
    )


def test_a_body_that_is_not_json_is_a_400() -> None:
    status, reply, _ = asyncio.run(_call("POST", "/v1/completions", b"{not json"))
    assert (status, reply["error"]["message"]) == (400, "the request body is not valid JSON")


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v1/embeddings", 404, "no such route: GET /v1/embeddings"),
        ("GET", "/v1/completions", 405, "Method Not Allowed: GET /v1/completions"),
    ],
)
def test_unknown_routes_answer_in_openais_error_envelope(
    method: str, path: str, status: int, message: str
) -> None:
    got, reply, request_id = asyncio.run(_call(method, path))
    assert (got, reply["error"]["message"], reply["error"]["type"]) == (
        status,
        message,
        "invalid_request_error",
    )
    assert len(request_id) == 32
