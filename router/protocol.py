"""The HTTP protocol's types and request parsing, free of aiohttp and Ray.

`parse_completion` turns a decoded JSON body of `/v1/completions` into a
`CompletionInput`, or raises `InvalidRequestError` with a message naming the
field; `router.http` answers that with a 400. The values themselves (prompt
length, token ids in the vocabulary) are checked later, against the model's
limits, by `replicas.api.validate_generate`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from replicas.api import GenerateResult, InvalidRequestError, StreamChunk

DEFAULT_MAX_TOKENS = 16
# Optional string fields: absent and null both mean "not given".
STRING_FIELDS = ("lora_name", "cache_salt", "request_id")


@dataclass
class CompletionInput:
    """A parsed completion request; exactly one of `text` / `token_ids`."""

    text: str | None = None
    token_ids: list[int] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    lora_name: str | None = None
    cache_salt: str | None = None
    request_id: str | None = None
    stream: bool = False


@dataclass
class RoutedResult:
    """A finished completion with what routing decided for it."""

    result: GenerateResult
    text: str
    predicted_hit_tokens: int
    reuse_hint_tokens: int
    routing_s: float
    attempts: int


class CompletionBackend(Protocol):
    """What the HTTP face needs from the router behind it."""

    model_name: str

    def decode(self, token_ids: list[int]) -> str: ...

    async def generate(self, body: CompletionInput) -> RoutedResult: ...

    def generate_stream(
        self, body: CompletionInput
    ) -> AsyncIterator[StreamChunk | RoutedResult]: ...

    def live_replicas(self) -> int: ...

    def status(self) -> dict[str, Any]: ...

    def render_metrics(self) -> bytes: ...


def parse_completion(body: Any) -> CompletionInput:
    """Validate the JSON shape of a /v1/completions body.

    `prompt` is a string, a list of token ids (ints, not booleans), or either
    of those wrapped in a one-element list (OpenAI's batch form with one
    prompt). `max_tokens` is an integer >= 1 (not a float, string or
    boolean), `stream` a boolean, and `lora_name`, `cache_salt`, `request_id`
    strings or null.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    text: str | None = None
    token_ids: list[int] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        token_ids = prompt
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return parse_completion({**body, "prompt": prompt[0]})
    else:
        raise InvalidRequestError("`prompt` must be a string or a list of token ids")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if type(max_tokens) is not int:
        raise InvalidRequestError("`max_tokens` must be an integer")
    if max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1")
    for key in STRING_FIELDS:
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InvalidRequestError(f"`{key}` must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("`stream` must be true or false")
    return CompletionInput(
        stream=stream,
        text=text,
        token_ids=token_ids,
        max_tokens=max_tokens,
        lora_name=body.get("lora_name"),
        cache_salt=body.get("cache_salt"),
        request_id=body.get("request_id"),
    )
