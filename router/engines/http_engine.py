"""An engine reached over HTTP as a `EngineBackend`: an OpenAI-style streamed completion.

What to send and which load metrics to read is the engine kind's `RequestDialect`
(`router/engines/vllm.py` for vLLM); this module is the transport. Each upstream SSE
event (an OpenAI completion chunk with the output's `token_ids`) becomes one
`StreamChunk` as it arrives.

Failures before the first byte of a 200 (connection refused or reset, a 5xx)
are `ReplicaUnavailableError`, which the service retries elsewhere; a 4xx is
the request's fault (`InvalidRequestError`, with the engine's message). Closing
the stream closes the upstream connection, which makes vLLM abort the request.
Load comes from the engine's Prometheus `/metrics`, by the dialect's sample names.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import aiohttp
import msgspec

from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ReplicaLoad,
    Snapshot,
    StreamChunk,
)
from kvroute.router.engines.backends import ReplicaUnavailableError
from kvroute.router.engines.kind import EngineAddress, RequestDialect


def parse_load(text: str, load_metrics: Mapping[str, str]) -> ReplicaLoad:
    """A ReplicaLoad from a Prometheus exposition (sums over an engine's label sets);
    `load_metrics` maps sample names to `ReplicaLoad` fields. Only the lines that
    start with a name asked for are read: vLLM's exposition is 50 KB of histograms,
    which a parser (86 ms) and then one pattern over the whole text (0.5 ms) both
    walked; finding the few lines costs microseconds."""
    values: dict[str, float] = {}
    pattern = _sample_pattern(tuple(load_metrics))
    for name, field in load_metrics.items():
        for start in _lines_starting(text, name):
            sample = pattern.match(text, start)
            if sample is None or sample.group(1) != name:
                continue  # a longer name, or no sample line
            try:
                values[field] = values.get(field, 0.0) + float(sample.group(2))
            except ValueError:
                raise ValueError(f"metric {name}: {sample.group(2)!r} is not a number") from None
    return ReplicaLoad(
        running_seqs=int(values.get("running_seqs", 0)),
        waiting_seqs=int(values.get("waiting_seqs", 0)),
        kv_usage=float(values.get("kv_usage", 0.0)),
    )


def _lines_starting(text: str, prefix: str) -> Iterator[int]:
    """The offset of every line of `text` that starts with `prefix`."""
    at = 0 if text.startswith(prefix) else _after_newline(text.find("\n" + prefix))
    while at >= 0:
        yield at
        at = _after_newline(text.find("\n" + prefix, at))


def _after_newline(found: int) -> int:
    return found + 1 if found >= 0 else -1


def metrics_url(base_url: str, names: Iterable[str]) -> str:
    """`/metrics` asking for `names` alone (`name[]`, as prometheus_client's own
    exposition app takes them, and serve-replica): a few hundred bytes instead of every
    histogram, rendered by the engine once a second for nothing. vLLM 0.32 answers
    `/metrics` from prometheus-fastapi-instrumentator's route, which ignores the
    filter and sends all 50 KB; `parse_load` reads the same samples either way."""
    return f"{base_url}/metrics?" + urllib.parse.urlencode([("name[]", n) for n in names])


@functools.cache
def _sample_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    """A sample line of one of `names`: the name, its labels (quoted values may hold
    braces and escaped quotes), the value; a timestamp after it is ignored."""
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    labels = r'(?:\{(?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*\})?'
    return re.compile(rf"^({alternatives}){labels}[ \t]+(\S+)", re.MULTILINE)


# How long a finished stream's body may take to end (awaited in the background)
# before its connection is closed.
DRAIN_S = 1.0
# Request bodies carry every prompt token id: msgspec encodes them several times
# faster than the json.dumps aiohttp would use.
_encode_body = msgspec.json.Encoder().encode


class _Usage:
    """What the stream reported so far."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens = num_prompt_tokens
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.output: list[int] = []


class HttpEngine:
    """One engine at `address.url` speaking `dialect`, through a shared, bounded session."""

    def __init__(self, address: EngineAddress, dialect: RequestDialect) -> None:
        self.name = address.name
        self.base_url = address.url.rstrip("/")
        self.model = address.model
        self.session = address.session
        self.dialect = dialect
        self._open: dict[str, aiohttp.ClientResponse] = {}
        self._draining: set[asyncio.Future[None]] = set()
        self._metrics_url = metrics_url(self.base_url, dialect.load_metrics)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = None
        async for item in self.generate_stream(request):
            result = item
        assert isinstance(result, GenerateResult)
        return result

    async def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        started = time.perf_counter()
        first_token_s: float | None = None
        response = await self._post(request)
        self._open[request.request_id] = response
        usage = _Usage(len(request.prompt_token_ids))
        complete = False
        try:
            async for event in _sse_events(response, self.name):
                new_tokens = self._absorb(event, usage)
                if new_tokens:
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - started
                    yield StreamChunk(
                        request.request_id, new_tokens, usage.prompt_tokens, usage.cached_tokens
                    )
            complete = True
        finally:
            self._open.pop(request.request_id, None)
            if not complete:
                response.close()  # vLLM aborts a request whose connection closes
        self._reuse(response)
        latency = time.perf_counter() - started
        yield GenerateResult(
            request_id=request.request_id,
            replica_id=self.name,
            output_token_ids=usage.output,
            finish_reason=usage.finish_reason,
            num_prompt_tokens=usage.prompt_tokens,
            num_cached_tokens=usage.cached_tokens,
            queue_s=0.0,
            ttft_s=first_token_s if first_token_s is not None else latency,
            latency_s=latency,
        )

    async def _post(self, request: GenerateRequest) -> aiohttp.ClientResponse:
        """The engine's 200 response to `request`. A pooled connection that the engine
        closes just as it is taken (its keep-alive timer and the pool's age check run
        on two clocks; seen against vLLM under load: "Can not write request body")
        fails on its first write or read: the request is sent once more, on another
        connection, before the engine counts as failing, which would route its
        traffic away from its cache."""
        url = f"{self.base_url}{self.dialect.completion_path}"
        body = _encode_body(self.dialect.completion_body(request, self.model))
        headers = {"X-Request-Id": request.request_id, "Content-Type": "application/json"}
        for attempt in (1, 2):
            try:
                response = await self.session.post(url, data=body, headers=headers)
                break
            except (aiohttp.ClientError, OSError) as exc:
                if attempt == 1 and _stale_connection(exc):
                    continue
                raise ReplicaUnavailableError(f"engine {self.name} unreachable: {exc}") from None
        if response.status == 200:
            return response
        detail = await _error_message(response)
        response.close()
        if response.status >= 500 or response.status == 429:
            status = response.status
            raise ReplicaUnavailableError(f"engine {self.name} answered {status}: {detail}")
        raise InvalidRequestError(f"engine {self.name} refused the request: {detail}")

    def _reuse(self, response: aiohttp.ClientResponse) -> None:
        """Give a finished stream's connection back to the pool. A connection released
        before its body's end is closed instead, which would cost the router and the
        engine a new connection for every request. The end follows `[DONE]` at once and
        has nearly always arrived with it; otherwise it is awaited in the background,
        so the stream's last chunk never waits for it."""
        if response.content.is_eof():
            response.release()
            return
        drain = asyncio.ensure_future(_drain(response))
        self._draining.add(drain)
        drain.add_done_callback(self._draining.discard)

    @staticmethod
    def _absorb(event: dict[str, Any], usage: _Usage) -> list[int]:
        """Take one SSE event's tokens and usage; returns the new token ids."""
        reported = event.get("usage")
        if isinstance(reported, dict):
            usage.prompt_tokens = int(reported.get("prompt_tokens", usage.prompt_tokens))
            details = reported.get("prompt_tokens_details") or {}
            usage.cached_tokens = int(details.get("cached_tokens") or 0)
        new_tokens: list[int] = []
        for choice in event.get("choices") or ():
            new_tokens.extend(choice.get("token_ids") or ())
            if choice.get("finish_reason") is not None:
                usage.finish_reason = choice["finish_reason"]
        usage.output.extend(new_tokens)
        return new_tokens

    def abort(self, request_id: str) -> None:
        """Close the request's connection: vLLM aborts a request whose client left."""
        response = self._open.pop(request_id, None)
        if response is not None:
            response.close()

    async def load(self) -> ReplicaLoad:
        try:
            async with self.session.get(self._metrics_url) as response:
                if response.status != 200:
                    raise ReplicaUnavailableError(f"engine {self.name} /metrics: {response.status}")
                text = await response.text()
        except (aiohttp.ClientError, OSError) as exc:
            raise ReplicaUnavailableError(f"engine {self.name} unreachable: {exc}") from None
        try:
            return parse_load(text, self.dialect.load_metrics)
        except ValueError as exc:
            raise ReplicaUnavailableError(f"engine {self.name} /metrics: {exc}") from None

    async def healthy(self) -> bool:
        """Does the engine's `/health` answer 200?"""
        try:
            async with self.session.get(f"{self.base_url}/health") as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def reset_prefix_cache(self) -> bool:
        """vLLM's `POST /reset_prefix_cache` (a dev-mode endpoint there)."""
        try:
            async with self.session.post(f"{self.base_url}/reset_prefix_cache") as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError) as exc:
            raise ReplicaUnavailableError(f"engine {self.name} unreachable: {exc}") from None

    async def snapshot(self) -> Snapshot | None:
        """vLLM has no snapshot: the index is rebuilt from the events that follow."""
        return None

    async def close(self) -> None:
        for response in self._open.values():
            response.close()
        self._open.clear()
        for drain in list(self._draining):
            drain.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)


def _stale_connection(exc: BaseException) -> bool:
    """A failure on a connection that was open (the engine closed it, or reset it),
    not one to connect: a new connection may well succeed."""
    established = isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
    return established and not isinstance(exc, aiohttp.ClientConnectorError)


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read to the body's end, then release; a body that does not end within
    `DRAIN_S` (or a cancelled drain) closes the connection instead."""
    try:
        async with asyncio.timeout(DRAIN_S):
            while await response.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    finally:
        if response.content.is_eof():
            response.release()
        else:
            response.close()


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The engine's error message (OpenAI's error shape), or its status text."""
    try:
        body = await response.json(content_type=None)
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        if isinstance(body, dict) and message is None:
            message = body.get("message")
    except (aiohttp.ClientError, ValueError):
        message = None
    return str(message or response.reason or response.status)[:500]


async def _sse_events(response: aiohttp.ClientResponse, name: str) -> AsyncIterator[dict[str, Any]]:
    """Each `data:` event of an SSE body as JSON, until `[DONE]`. The body is read in
    whatever pieces arrive and cut into lines here: one await per piece, not one per
    line (an event is a data line and a blank one)."""
    rest = b""
    try:
        async for piece in response.content.iter_any():
            lines = (rest + piece).split(b"\n")
            rest = lines.pop()
            for line in lines:
                event = _sse_event(line, name)
                if event is _DONE:
                    return
                if event is not None:
                    yield event  # type: ignore[misc]
    except (aiohttp.ClientError, OSError) as exc:
        raise ReplicaUnavailableError(f"engine {name} dropped the stream: {exc}") from None
    if _sse_event(rest, name) is _DONE:
        return
    raise ReplicaUnavailableError(f"engine {name} ended the stream without [DONE]")


_DONE = object()


def _sse_event(line: bytes, name: str) -> dict[str, Any] | object | None:
    """One SSE line: its JSON event, `_DONE` at `[DONE]`, None for anything else."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return _DONE
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise ReplicaUnavailableError(f"engine {name} sent malformed JSON") from None
    if not isinstance(event, dict):
        return None
    if "error" in event:
        raise ReplicaUnavailableError(f"engine {name} failed mid-stream: {event['error']}")
    return event
