"""The OpenAI-compatible HTTP protocol: request parsing and types, free of aiohttp and Ray.

`parse_completions` and `parse_chat` turn a decoded JSON body into a call, or raise
`InvalidRequestError` naming the field (`param`); `router.http` answers that with
OpenAI's error body. Every sampling parameter a client may send is either carried
to the replica or refused by name: none is silently dropped. Fields this server
does not know at all are ignored, as OpenAI-compatible servers do.

Every sampling value the engine will use is range-checked here, as vLLM's
`SamplingParams` checks it (temperature in [0, 2], top_p in (0, 1], top_k 0 or
-1 for off, no empty stop string) and every seed the engine will use, seed + j
for choice j, within `SEED_MIN`..`SEED_MAX`. Values that need the model (prompt
length, token ids in the vocabulary, stop token ids too, the context) are checked
later, against the model's limits, by `replicas.api.validate_generate`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from kvroute.replicas.api import (
    MAX_TEMPERATURE,
    SEED_MAX,
    SEED_MIN,
    GenerateResult,
    InvalidRequestError,
    SamplingOptions,
    StreamChunk,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 16
MAX_STOP = 4
# A batch of more prompts than this is refused before any is looked at
# (router.max_prompts_per_request sets the router's).
MAX_PROMPTS = 256
# A client's `request_id` is echoed in every response: bounded, and valid text.
MAX_REQUEST_ID_CHARS = 256
# Known fields this server cannot honour, each with the value that means "off".
UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
STRING_FIELDS = ("lora_name", "cache_salt", "request_id", "model", "user")


class ModelNotFoundError(InvalidRequestError):
    """The `model` names neither the served model nor one of its adapters (HTTP 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", "model")


@dataclass(frozen=True)
class CompletionInput:
    """One generation to route: a single prompt and one choice.

    `max_tokens` None means "up to the model's context", which needs the prompt's
    length and is resolved when the prompt is tokenized. `request_id` is the
    client's id for the response; the router gives every dispatch its own internal
    id, so clients' ids never collide on a replica."""

    text: str | None = None
    token_ids: list[int] | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    lora_name: str | None = None
    cache_salt: str | None = None
    request_id: str | None = None
    stream: bool = False
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Text generation stops before any of these; the replica is told to stop.
    stop: tuple[str, ...] = ()
    # Seconds the client allows (kvroute's `timeout` field); the config caps it.
    timeout_s: float | None = None


@dataclass(frozen=True)
class GenerationParams:
    """What completions and chat share: limits, sampling, choices, streaming."""

    model: str | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    lora_name: str | None = None
    cache_salt: str | None = None
    request_id: str | None = None
    timeout_s: float | None = None

    def inputs(
        self, prompt: str | list[int], choice: int, lora_name: str | None
    ) -> CompletionInput:
        """The dispatch unit for one choice of one prompt. Choice j of a seeded
        request samples with seed + j, so choices differ and each is reproducible."""
        sampling = self.sampling
        if choice and sampling.seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + choice)
        return CompletionInput(
            text=prompt if isinstance(prompt, str) else None,
            token_ids=None if isinstance(prompt, str) else list(prompt),
            max_tokens=self.max_tokens,
            lora_name=lora_name,
            cache_salt=self.cache_salt,
            request_id=self.request_id,
            stream=self.stream,
            sampling=sampling,
            stop=self.stop,
            timeout_s=self.timeout_s,
        )


@dataclass(frozen=True)
class CompletionsCall:
    """A /v1/completions request: one or more prompts, `n` choices each."""

    prompts: tuple[str | list[int], ...]
    params: GenerationParams
    echo: bool = False


@dataclass(frozen=True)
class ChatCall:
    """A /v1/chat/completions request: one conversation, `n` choices."""

    messages: tuple[dict[str, Any], ...]
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass
class RoutedResult:
    """A finished completion with what routing decided for it."""

    result: GenerateResult
    predicted_hit_tokens: int
    reuse_hint_tokens: int
    routing_s: float
    attempts: int


class CompletionRouter(Protocol):
    """What the HTTP face needs from the router behind it."""

    model_name: str

    def decode(self, token_ids: list[int]) -> str: ...

    def resolve_model(self, model: str | None) -> str | None: ...

    def render_chat(self, messages: tuple[dict[str, Any], ...]) -> list[int]: ...

    def models(self) -> list[dict[str, Any]]: ...

    async def generate(self, body: CompletionInput) -> RoutedResult: ...

    def generate_stream(
        self, body: CompletionInput
    ) -> AsyncIterator[StreamChunk | RoutedResult]: ...

    def live_replicas(self) -> int: ...

    def status(self) -> dict[str, Any]: ...

    def render_metrics(self) -> bytes: ...

    def record_response(self, endpoint: str, status: int, error_kind: str | None) -> None: ...


# --- field readers: each raises InvalidRequestError naming its field -----------


def _int(body: dict[str, Any], key: str, default: int | None, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if type(value) is not int:
        raise InvalidRequestError(f"`{key}` must be an integer", key)
    if value < low:
        raise InvalidRequestError(f"`{key}` must be at least {low}, got {value}", key)
    return value


def _number(
    body: dict[str, Any], key: str, default: float, ok: Callable[[float], bool], rule: str
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise InvalidRequestError(f"`{key}` must be a number", key)
    if not ok(value):
        raise InvalidRequestError(f"`{key}` must be {rule}, got {value}", key)
    return float(value)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"`{key}` must be true or false", key)
    return value


def _text(value: str, param: str) -> str:
    """`value` if it is valid Unicode text; a lone surrogate (JSON allows "\ud800")
    cannot be encoded, so it is refused here rather than failing in the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"`{param}` is not valid Unicode text", param) from None
    return value


_INT_ONLY = frozenset({int})


def _token_list(value: Any) -> bool:
    """A list of ints (bools are not token ids). The type check runs in C: a Python
    loop over a 256-token prompt cost about 80 us a request, a sixth of the front
    door's time."""
    return isinstance(value, list) and _INT_ONLY.issuperset(map(type, value))


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("`stop` must be a non-empty string or a list of them", "stop")
    for text in stops:
        _text(text, "stop")
    if len(stops) > MAX_STOP:
        raise InvalidRequestError(f"`stop` takes at most {MAX_STOP} sequences", "stop")
    return tuple(stops)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, off in UNSUPPORTED_UNLESS.items():
        if key in body and body[key] not in off:
            raise InvalidRequestError(f"`{key}` is not supported by this server", key)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise InvalidRequestError("`best_of` is not supported by this server", "best_of")


def _params(body: dict[str, Any], default_max_tokens: int | None) -> GenerationParams:
    """The fields completions and chat share."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    _refuse_unsupported(body)
    for key in STRING_FIELDS:
        if body.get(key) is not None and not isinstance(body[key], str):
            raise InvalidRequestError(f"`{key}` must be a string", key)
    request_id = body.get("request_id")
    if request_id is not None:
        _text(request_id, "request_id")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError(
                f"`request_id` takes at most {MAX_REQUEST_ID_CHARS} characters", "request_id"
            )
    max_tokens = _int(body, "max_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_completion_tokens", default_max_tokens, 1)
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and (
        not _token_list(stop_token_ids) or (stop_token_ids and min(stop_token_ids) < 0)
    ):
        raise InvalidRequestError(
            "`stop_token_ids` must be a list of non-negative token ids", "stop_token_ids"
        )
    n = _int(body, "n", 1, 1)
    assert n is not None
    if n > MAX_N:
        raise InvalidRequestError(f"`n` must be at most {MAX_N}, got {n}", "n")
    sampling = SamplingOptions(
        temperature=_number(
            body,
            "temperature",
            1.0,
            lambda v: 0 <= v <= MAX_TEMPERATURE,
            f"in [0, {MAX_TEMPERATURE:g}]",
        ),
        top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=_top_k(body),
        seed=_seed(body, n),
        stop_token_ids=tuple(stop_token_ids or ()),
        ignore_eos=_bool(body, "ignore_eos"),
    )
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise InvalidRequestError(
            "`stream_options` must be an object, and only with `stream: true`", "stream_options"
        )
    include_usage = _bool(options, "include_usage") if options else False
    timeout = body.get("timeout")
    if timeout is not None:
        timeout = _number(body, "timeout", 0.0, lambda v: v > 0, "a positive number of seconds")
    return GenerationParams(
        timeout_s=timeout,
        model=body.get("model"),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=_stop(body),
        n=n,
        stream=stream,
        include_usage=include_usage,
        lora_name=body.get("lora_name"),
        cache_salt=body.get("cache_salt"),
        request_id=request_id,
    )


def _seed(body: dict[str, Any], n: int) -> int | None:
    """The request's seed: choice j samples with seed + j, so seed + n - 1 must
    fit too (torch's generator refuses a seed out of range, mid-step)."""
    seed = body.get("seed")
    if seed is None:
        return None
    if type(seed) is not int:
        raise InvalidRequestError("`seed` must be an integer", "seed")
    if not SEED_MIN <= seed <= SEED_MAX - (n - 1):
        raise InvalidRequestError(
            f"`seed` must be in [{SEED_MIN}, {SEED_MAX}], and so must `seed` + `n` - 1 "
            f"(choice j samples with seed + j); got {seed} with n = {n}",
            "seed",
        )
    return seed


def _top_k(body: dict[str, Any]) -> int:
    """OpenAI has no top_k; vLLM's -1 and 0 both mean off."""
    value = body.get("top_k")
    if value is None or value == -1:
        return 0
    top_k = _int(body, "top_k", 0, 0)
    assert top_k is not None
    return top_k


def parse_completions(body: Any, max_prompts: int = MAX_PROMPTS) -> CompletionsCall:
    """A /v1/completions body: `prompt` is a string, a list of token ids, or a
    non-empty list of at most `max_prompts` of either (a batch). The batch's size is
    checked first, so a huge batch costs no more than a small one to refuse."""
    params = _params(body, DEFAULT_MAX_TOKENS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > max_prompts and not _token_list(prompt):
        raise InvalidRequestError(
            f"`prompt` takes at most {max_prompts} prompts in one request, got {len(prompt)}",
            "prompt",
        )
    if isinstance(prompt, str) or prompt == [] or _token_list(prompt):
        prompts: tuple[str | list[int], ...] = (prompt,)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or (_token_list(p) and p) for p in prompt)
    ):
        prompts = tuple(prompt)
    else:
        raise InvalidRequestError(
            "`prompt` must be a string, a list of token ids, or a list of either", "prompt"
        )
    for text in prompts:
        if isinstance(text, str):
            _text(text, "prompt")
    echo = _bool(body, "echo")
    if echo and params.max_tokens is None:
        raise InvalidRequestError("`echo` needs `max_tokens`", "echo")
    return CompletionsCall(prompts, params, echo)


def parse_chat(body: Any) -> ChatCall:
    """A /v1/chat/completions body: `messages` is a non-empty list of
    {role, content} objects, content a string or a list of text parts."""
    params = _params(body, None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("`messages` must be a non-empty list", "messages")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    return ChatCall(parsed, params)


def _message(message: Any, i: int) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"`{param}` must be an object", param)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise InvalidRequestError(
            f"`{param}.role` must be system, developer, user, assistant or tool", param
        )
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise InvalidRequestError(
                f"`{param}.content` parts must be text: this model takes no images or audio",
                param,
            )
        text_parts = [p.get("text") for p in content]
        if not all(isinstance(t, str) for t in text_parts):
            raise InvalidRequestError(f"`{param}.content` text parts need `text`", param)
        content = "".join(text_parts)  # type: ignore[arg-type]
    elif content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise InvalidRequestError(f"`{param}.content` must be a string", param)
    return {"role": role, "content": _text(content, param)}


__all__ = [
    "ChatCall",
    "CompletionInput",
    "CompletionRouter",
    "CompletionsCall",
    "GenerationParams",
    "ModelNotFoundError",
    "RoutedResult",
    "parse_chat",
    "parse_completions",
]
