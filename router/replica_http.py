"""One replica's own HTTP server, shaped as vLLM's OpenAI server (`kvroute serve-replica`).

A router written for vLLM can proxy to it unchanged: the bodies, stream chunks,
errors and metric names are vLLM's. Requests go straight to one engine through a
`ReplicaBackend` (`replicas.serving.ReplicaCore`); there is no routing here.

vLLM's shapes, as its OpenAI server writes them:
- a completion choice has `index`, `text`, `logprobs`, `finish_reason`,
  `stop_reason` (the stop string or stop token id; None for EOS and length),
  `token_ids` and `prompt_token_ids` (with `return_token_ids`, else null);
  a chat response has `prompt_token_ids` at the top and `token_ids` per choice;
- stream chunks carry only the fields vLLM sets (`prompt_token_ids` in a
  choice's first chunk only), then, with `stream_options.include_usage`, a chunk
  with no choices and the usage; every event is `data: {json}\\n\\n`, the last
  `data: [DONE]\\n\\n`;
- `usage.prompt_tokens_details.cached_tokens` with `--enable-prompt-tokens-details`
  (on by default here), else `prompt_tokens_details` is null;
- errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP
  status as `code`: 400 `BadRequestError`, 404 `NotFoundError` (an unknown model
  or route), 413, 500 `InternalServerError`;
- the text of a token that stopped generation (EOS or a stop token id) is not in
  `text`, but is in `token_ids`.

A client that disconnects cancels its handler (aiohttp's `handler_cancellation`),
which closes the engine stream and aborts the request: its blocks are freed
before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ModelLimits,
    ReplicaCounters,
    ReplicaLoad,
    RequestAbortedError,
    StreamChunk,
    validate_generate,
)
from router.chat import ChatTemplate
from router.detokenize import TextAssembler
from router.http import error_body
from router.protocol import (
    ChatCall,
    CompletionsCall,
    GenerationParams,
    ModelNotFoundError,
    parse_chat,
    parse_completions,
)
from router.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    503: "ServiceUnavailableError",
}


class ReplicaBackend(Protocol):
    """What the HTTP face needs from the engine behind it."""

    @property
    def serving(self) -> bool: ...

    def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]: ...

    def load(self) -> ReplicaLoad: ...

    def counters(self) -> ReplicaCounters: ...

    def reset_prefix_cache(self) -> bool: ...


@dataclass(frozen=True)
class ServedModel:
    """The model this server answers for, and how it answers."""

    name: str  # the served model name (`model` in requests and responses)
    root: str  # the checkpoint directory, or the name for random weights
    limits: ModelLimits
    eos_token_ids: tuple[int, ...] = ()
    engine_index: int = 0  # vLLM's `engine` metric label: the data-parallel rank
    enable_prompt_tokens_details: bool = True
    max_body_bytes: int = 4 * 1024 * 1024


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


# ----------------------------------------------------------------- generation


@dataclass
class _Choice:
    """One choice of one prompt as it runs: what is known so far."""

    index: int
    prompt_index: int
    request: GenerateRequest
    stop: tuple[str, ...]
    stop_tokens: frozenset[int]  # ids that end generation: stop_token_ids, EOS
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sent_prompt: bool = False  # a stream sent prompt_token_ids (first chunk only)


@dataclass
class _Delta:
    choice: _Choice
    text: str
    token_ids: list[int]
    finished: bool


@dataclass
class _Call:
    """A request expanded to choices, with what every response of it shares."""

    response_id: str
    model: str
    created: int
    prompts: list[list[int]]
    choices: list[_Choice]
    return_token_ids: bool
    include_usage: bool
    echo: list[str] = field(default_factory=list)


class ReplicaFrontend:
    """The vLLM-shaped API over one backend: expansion, text, bodies."""

    def __init__(
        self,
        backend: ReplicaBackend,
        model: ServedModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
    ) -> None:
        self.backend = backend
        self.model = model
        self.tokenizer = tokenizer
        self.template = template

    def resolve_model(self, name: Any) -> str | None:
        """The LoRA adapter `model` names (None: the base model); vLLM's 404 otherwise."""
        if name is None or name == self.model.name:
            return None
        if not isinstance(name, str) or name not in self.model.limits.lora_names:
            raise ModelNotFoundError(str(name))
        return name

    def render_chat(self, messages: tuple[dict[str, Any], ...]) -> list[int]:
        text = self.template.render(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _call(
        self,
        prefix: str,
        prompts: list[list[int]],
        params: GenerationParams,
        return_token_ids: bool,
    ) -> _Call:
        lora_name = self.resolve_model(params.model)
        limits = self.model.limits
        stop_ids = frozenset(params.sampling.stop_token_ids)
        if not params.sampling.ignore_eos:
            stop_ids |= frozenset(self.model.eos_token_ids)
        for prompt in prompts:
            max_tokens = params.max_tokens or limits.max_model_len - len(prompt)
            validate_generate(prompt, max_tokens, lora_name, limits)
        internal = uuid.uuid4().hex
        choices = []
        for p, prompt in enumerate(prompts):
            for j in range(params.n):
                unit = params.inputs(prompt, j, lora_name)
                choices.append(
                    _Choice(
                        index=len(choices),
                        prompt_index=p,
                        request=GenerateRequest(
                            request_id=f"{prefix}-{internal}-{len(choices)}",
                            prompt_token_ids=prompt,
                            max_tokens=params.max_tokens or limits.max_model_len - len(prompt),
                            lora_name=lora_name,
                            cache_salt=params.cache_salt,
                            sampling=unit.sampling,
                        ),
                        stop=params.stop,
                        stop_tokens=stop_ids,
                    )
                )
        return _Call(
            response_id=f"{prefix}-{params.request_id or uuid.uuid4().hex}",
            model=lora_name or self.model.name,
            created=int(time.time()),
            prompts=prompts,
            choices=choices,
            return_token_ids=return_token_ids,
            include_usage=params.include_usage,
        )

    def completions_call(self, call: CompletionsCall, return_token_ids: bool) -> _Call:
        prompts = [
            self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in call.prompts
        ]
        expanded = self._call("cmpl", prompts, call.params, return_token_ids)
        if call.echo:
            expanded.echo = [
                p if isinstance(p, str) else self.tokenizer.decode(list(p)) for p in call.prompts
            ]
        return expanded

    def chat_call(self, call: ChatCall, return_token_ids: bool) -> _Call:
        prompt = self.render_chat(call.messages)
        return self._call("chatcmpl", [prompt], call.params, return_token_ids)

    # ------------------------------------------------------------- running

    async def _run(self, choice: _Choice) -> AsyncIterator[_Delta]:
        """One choice's deltas. The engine finishes a request on a token of
        `stop_tokens` or at `max_tokens` (length first), so the chunk that finishes
        is known when it comes and carries the finish reason, as in vLLM."""
        request = choice.request
        assembler = TextAssembler(self.tokenizer.decode, choice.stop)
        items = self.backend.generate_stream(request)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, GenerateResult):  # finished without a new token
                    yield self._finish(choice, assembler, [], item)
                    return
                new = list(item.new_token_ids)
                choice.token_ids.extend(new)
                choice.prompt_tokens = item.num_prompt_tokens
                choice.cached_tokens = item.num_cached_tokens
                length = len(choice.token_ids) >= request.max_tokens
                if length or new[-1] in choice.stop_tokens:
                    result = await anext(items)
                    assert isinstance(result, GenerateResult)
                    yield self._finish(choice, assembler, new, result)
                    return
                text = assembler.add(new, False)
                if assembler.stopped:
                    self._stopped_by_string(choice, assembler)
                    yield _Delta(choice, text, new, True)
                    return  # closing the stream aborts the request
                yield _Delta(choice, text, new, False)

    def _finish(
        self, choice: _Choice, assembler: TextAssembler, new: list[int], result: GenerateResult
    ) -> _Delta:
        """The last delta: a stop token's own text is left out, as vLLM leaves it."""
        reason = result.finish_reason
        by_token = reason == "stop" and bool(choice.token_ids)
        text_ids = new[:-1] if by_token and new else new
        text = assembler.add(text_ids, True)
        if assembler.stopped:
            self._stopped_by_string(choice, assembler)
            return _Delta(choice, text, new, True)
        choice.text = assembler.text
        choice.finish_reason = reason
        last = choice.token_ids[-1] if by_token else None
        eos = () if choice.request.sampling.ignore_eos else self.model.eos_token_ids
        if last is not None and last not in eos and last in choice.request.sampling.stop_token_ids:
            choice.stop_reason = last
        return _Delta(choice, text, new, True)

    def _stopped_by_string(self, choice: _Choice, assembler: TextAssembler) -> None:
        choice.text = assembler.text
        choice.finish_reason = "stop"
        decoded = self.tokenizer.decode(choice.token_ids)
        cut = len(assembler.text)
        choice.stop_reason = next((s for s in choice.stop if decoded.startswith(s, cut)), None)

    async def collect(self, call: _Call) -> None:
        """Every choice to its end, concurrently; the first failure cancels the rest."""

        async def one(choice: _Choice) -> None:
            async for _ in self._run(choice):
                pass

        if len(call.choices) == 1:
            await one(call.choices[0])
            return
        tasks = [asyncio.ensure_future(one(c)) for c in call.choices]
        try:
            await asyncio.gather(*tasks)
        finally:
            await _cancel(tasks)

    async def merged(self, call: _Call) -> AsyncIterator[_Delta]:
        """Every choice's deltas as they come, interleaved; cancelled together."""
        if len(call.choices) == 1:
            async for delta in self._run(call.choices[0]):
                yield delta
            return
        queue: asyncio.Queue[_Delta | BaseException | None] = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            try:
                async for delta in self._run(choice):
                    await queue.put(delta)
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.ensure_future(pump(c)) for c in call.choices]
        running = len(tasks)
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            await _cancel(tasks)

    # -------------------------------------------------------------- bodies

    def usage(self, call: _Call, cached_tokens: int | None) -> dict[str, Any]:
        prompt = sum(len(p) for p in call.prompts)
        completion = sum(len(c.token_ids) for c in call.choices)
        details = None
        if self.model.enable_prompt_tokens_details and cached_tokens is not None:
            details = {"cached_tokens": cached_tokens}
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": details,
        }

    @staticmethod
    def _last_prompt_cached(call: _Call) -> int:
        """vLLM reports the cached tokens of the batch's last prompt."""
        last = max(c.prompt_index for c in call.choices)
        return next(c.cached_tokens for c in call.choices if c.prompt_index == last)

    def completion_body(self, call: _Call) -> dict[str, Any]:
        choices = []
        for c in call.choices:
            prompt = call.prompts[c.prompt_index]
            echo = call.echo[c.prompt_index] if call.echo else ""
            token_ids = [*prompt, *c.token_ids] if call.echo else c.token_ids
            choices.append(
                {
                    "index": c.index,
                    "text": echo + c.text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": token_ids if call.return_token_ids else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": prompt if call.return_token_ids else None,
                }
            )
        return {
            "id": call.response_id,
            "object": "text_completion",
            "created": call.created,
            "model": call.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(call, self._last_prompt_cached(call)),
            "kv_transfer_params": None,
        }

    def chat_body(self, call: _Call) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {
                    "role": "assistant",
                    "content": c.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "token_ids": c.token_ids if call.return_token_ids else None,
            }
            for c in call.choices
        ]
        return {
            "id": call.response_id,
            "object": "chat.completion",
            "created": call.created,
            "model": call.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(call, self._last_prompt_cached(call)),
            "prompt_logprobs": None,
            "prompt_token_ids": call.prompts[0] if call.return_token_ids else None,
            "kv_transfer_params": None,
        }

    def _envelope(self, call: _Call, kind: str) -> dict[str, Any]:
        return {
            "id": call.response_id,
            "object": kind,
            "created": call.created,
            "model": call.model,
        }

    def _usage_chunk(self, call: _Call, kind: str, cached: int | None) -> dict[str, Any]:
        """The last chunk with `include_usage`: no choices, the totals, no nulls."""
        usage = {k: v for k, v in self.usage(call, cached).items() if v is not None}
        return {**self._envelope(call, kind), "choices": [], "usage": usage}

    async def completion_chunks(self, call: _Call) -> AsyncIterator[dict[str, Any]]:
        cached: int | None = None
        async for d in self.merged(call):
            c = d.choice
            if cached is None:
                cached = c.cached_tokens
            prompt = call.prompts[c.prompt_index]
            first = not c.sent_prompt
            c.sent_prompt = True
            echo = call.echo[c.prompt_index] if call.echo and first else ""
            token_ids = [*prompt, *d.token_ids] if echo else d.token_ids
            send_prompt = call.return_token_ids and (first or bool(echo))
            choice = {
                "index": c.index,
                "text": echo + d.text,
                "logprobs": None,
                "finish_reason": c.finish_reason if d.finished else None,
                "stop_reason": c.stop_reason if d.finished else None,
                "prompt_token_ids": prompt if send_prompt else None,
                "token_ids": token_ids if call.return_token_ids else None,
            }
            yield {**self._envelope(call, "text_completion"), "choices": [choice]}
        if call.include_usage:
            yield self._usage_chunk(call, "text_completion", cached)

    async def chat_chunks(self, call: _Call) -> AsyncIterator[dict[str, Any]]:
        """A role chunk per choice first (with `prompt_token_ids` when asked), then
        content deltas, the last with the finish and stop reasons."""
        kind = "chat.completion.chunk"
        for c in call.choices:
            first: dict[str, Any] = {
                **self._envelope(call, kind),
                "choices": [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            if call.return_token_ids:
                first["prompt_token_ids"] = call.prompts[c.prompt_index]
            yield first
        cached: int | None = None
        async for d in self.merged(call):
            c = d.choice
            if cached is None:
                cached = c.cached_tokens
            choice: dict[str, Any] = {
                "index": c.index,
                "delta": {"content": d.text},
                "logprobs": None,
                "finish_reason": c.finish_reason if d.finished else None,
            }
            if d.finished:
                choice["stop_reason"] = c.stop_reason
            choice["token_ids"] = d.token_ids if call.return_token_ids else None
            yield {**self._envelope(call, kind), "choices": [choice]}
        if call.include_usage:
            yield self._usage_chunk(call, kind, cached)

    def models(self) -> dict[str, Any]:
        """vLLM's model list: the base model, then one card per LoRA adapter."""
        created = int(time.time())
        base = {
            "id": self.model.name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": self.model.root,
            "parent": None,
            "max_model_len": self.model.limits.max_model_len,
            "permission": [_permission(created)],
        }
        adapters = [
            {
                **base,
                "id": name,
                "root": name,
                "parent": self.model.name,
                "max_model_len": None,
                "permission": [_permission(created)],
            }
            for name in self.model.limits.lora_names
        ]
        return {"object": "list", "data": [base, *adapters]}


def _permission(created: int) -> dict[str, Any]:
    return {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait for them, so each closes its stream (an abort) first."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -------------------------------------------------------------------- metrics


METRIC_HELP = {
    "num_requests_running": "Number of requests in model execution batches.",
    "num_requests_waiting": "Number of requests waiting to be processed.",
    "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
}


class ReplicaCollector(Collector):
    """vLLM's metric names, read from the backend at scrape time (levels as gauges,
    totals as counters), labelled `model_name` and `engine` as vLLM labels them."""

    def __init__(self, backend: ReplicaBackend, model: ServedModel) -> None:
        self._backend = backend
        self._labels = [model.name, str(model.engine_index)]

    def collect(self) -> Iterator[Metric]:
        load = self._backend.load()
        totals = self._backend.counters()
        names = ["model_name", "engine"]
        gauges = {
            "num_requests_running": load.running_seqs,
            "num_requests_waiting": load.waiting_seqs,
            "kv_cache_usage_perc": load.kv_usage,
        }
        for name, level in gauges.items():
            gauge = GaugeMetricFamily(f"vllm:{name}", METRIC_HELP[name], labels=names)
            gauge.add_metric(self._labels, level)
            yield gauge
        counters = {
            "prefix_cache_queries": totals.prefix_cache_queries,
            "prefix_cache_hits": totals.prefix_cache_hits,
            "prompt_tokens": totals.prompt_tokens,
            "generation_tokens": totals.generation_tokens,
        }
        for name, total in counters.items():
            counter = CounterMetricFamily(f"vllm:{name}", METRIC_HELP[name], labels=names)
            counter.add_metric(self._labels, total)
            yield counter


# ------------------------------------------------------------------------ app


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InvalidRequestError("the request body is not valid JSON") from None


def _flag(body: Any, key: str) -> bool:
    value = body.get(key) if isinstance(body, dict) else None
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError(f"`{key}` must be true or false", key)
    return bool(value)


def _sse_line(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse(request: web.Request, chunks: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Server-sent events; a failure once the stream has begun is vLLM's error event,
    then `[DONE]`."""
    async with contextlib.aclosing(chunks):
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(_sse_line(chunk))
        except Exception as exc:
            reply = _reply_to(exc)
            if reply is None or reply.text is None:
                logger.exception("stream %s failed", request.path)
                body = error_body("internal error", "InternalServerError", None, 500)
            else:
                body = json.loads(reply.text)
            await response.write(_sse_line(body))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response


def build_replica_app(
    backend: ReplicaBackend, model: ServedModel, tokenizer: Tokenizer, template: ChatTemplate
) -> web.Application:
    front = ReplicaFrontend(backend, model, tokenizer, template)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ReplicaCollector(backend, model))

    async def body_of(request: web.Request) -> Any:
        return _decode_json(await request.read())

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await body_of(request)
        call = front.completions_call(parse_completions(body), _flag(body, "return_token_ids"))
        if _flag(body, "stream"):
            return await _sse(request, front.completion_chunks(call))
        await front.collect(call)
        return web.json_response(front.completion_body(call))

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        body = await body_of(request)
        call = front.chat_call(parse_chat(body), _flag(body, "return_token_ids"))
        if _flag(body, "stream"):
            return await _sse(request, front.chat_chunks(call))
        await front.collect(call)
        return web.json_response(front.chat_body(call))

    async def tokenize(request: web.Request) -> web.Response:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        front.resolve_model(body.get("model"))
        if "messages" in body:
            tokens = front.render_chat(parse_chat({"messages": body["messages"]}).messages)
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
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application(client_max_size=model.max_body_bytes, middlewares=[error_middleware])
    app.add_routes(
        [
            web.post("/v1/completions", completions),
            web.post("/v1/chat/completions", chat_completions),
            web.post("/tokenize", tokenize),
            web.get("/v1/models", models),
            web.get("/health", health),
            web.get("/metrics", metrics),
            web.post("/reset_prefix_cache", reset_prefix_cache),
        ]
    )
    return app
