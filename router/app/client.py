"""Python client for the router's HTTP API (sync, async, and batches).

aiohttp and tqdm are imported by the async methods only, so that `kvroute submit`
and `kvroute status` start fast.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import aiohttp


class KVRouteError(RuntimeError):
    """The router answered with an error; `status` is the HTTP status, `retry_after_s`
    its Retry-After (None if absent)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


# Busy (429) and momentarily without a replica (503): worth another try shortly.
RETRY_STATUSES = frozenset({429, 503})
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by kvroute)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def retry_delay(error: KVRouteError, attempt: int, deadline: float) -> float | None:
    """How long to wait before retrying `error` (the router's Retry-After, else an
    exponential backoff), or None when it is not worth retrying or the wait would end
    past `deadline` (time.monotonic)."""
    if error.status not in RETRY_STATUSES:
        return None
    backoff = min(BACKOFF_FIRST_S * 2**attempt, BACKOFF_MAX_S)
    delay = max(backoff, error.retry_after_s or 0.0)
    return delay if time.monotonic() + delay < deadline else None


T = TypeVar("T")


class RouterUnreachableError(ConnectionError):
    """Nothing answered at the router's URL (not running, wrong address, or refused)."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"no kvroute router answers at {url} ({reason})")
        self.url = url


def _body(
    prompt: str | Sequence[int], max_tokens: int, lora_name: str | None, cache_salt: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
    }
    if lora_name is not None:
        body["lora_name"] = lora_name
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    return body


class KVRouteClient:
    """`generate` returns the OpenAI-style completion dict, with a `kvroute`
    section naming the replica and its cached tokens.

    `base_url` may name several routers of one tier, comma-separated or as a list:
    requests spread over them in turn, and one that does not answer (down,
    restarting, or gone mid-request) is retried on the next, so losing a router
    loses no request."""

    def __init__(self, base_url: str | Sequence[str], timeout_s: float = 300.0) -> None:
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        self.base_urls = [url.strip().rstrip("/") for url in urls if url.strip()]
        if not self.base_urls:
            raise ValueError("KVRouteClient needs at least one router URL")
        self.timeout_s = timeout_s
        self._turn = 0

    @property
    def base_url(self) -> str:
        return self.base_urls[0]

    def _rotation(self) -> list[str]:
        """Every router URL, starting with the next one in turn."""
        start = self._turn % len(self.base_urls)
        self._turn += 1
        return self.base_urls[start:] + self.base_urls[:start]

    def _with_failover(self, call: Callable[[str], T]) -> T:
        last: RouterUnreachableError | None = None
        for url in self._rotation():
            try:
                return call(url)
            except RouterUnreachableError as exc:
                last = exc
        assert last is not None
        raise last

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> dict[str, Any]:
        """One completion; a 429 or 503 is retried with backoff (honouring
        Retry-After) while the client's `timeout_s` allows."""
        data = json.dumps(_body(prompt, max_tokens, lora_name, cache_salt)).encode()

        def post(url: str) -> dict[str, Any]:
            request = urllib.request.Request(
                f"{url}/v1/completions", data=data, headers={"Content-Type": "application/json"}
            )
            with self._open(request, url) as response:
                try:
                    return json.loads(response.read())
                except (ConnectionError, http.client.HTTPException) as exc:
                    raise RouterUnreachableError(url, exc) from None

        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            try:
                return self._with_failover(post)
            except KVRouteError as exc:
                delay = retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def _open(self, request: urllib.request.Request | str, url: str) -> Any:
        """The response to `request`; an HTTP error status raises KVRouteError, and a
        router that does not answer raises RouterUnreachableError naming its URL."""
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            retry_after = _retry_after(exc.headers.get("Retry-After"))
            raise KVRouteError(exc.code, _message(exc.read()), retry_after) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise RouterUnreachableError(url, reason) from None

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield server-sent chunks: text deltas, each choice's finishing chunk, then
        (OpenAI's `include_usage`) a last chunk with no choices and the usage."""
        body = {
            **_body(prompt, max_tokens, lora_name, cache_salt),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        request = urllib.request.Request(
            f"{self.base_url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with self._open(request, self.base_url) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise KVRouteError(503, chunk["error"]["message"])
                yield chunk

    def get_json(self, path: str) -> dict[str, Any]:
        """GET `path` from the first router that answers."""

        def get(url: str) -> dict[str, Any]:
            with self._open(f"{url}{path}", url) as response:
                return json.loads(response.read())

        return self._with_failover(get)

    def status(self) -> dict[str, Any]:
        return self.get_json("/status")

    async def agenerate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> dict[str, Any]:
        import aiohttp

        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self.agenerate(
                    prompt, max_tokens, lora_name=lora_name, cache_salt=cache_salt, session=own
                )
        body = _body(prompt, max_tokens, lora_name, cache_salt)
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            try:
                return await self._apost(session, body, deadline)
            except KVRouteError as exc:
                delay = retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def _apost(
        self, session: aiohttp.ClientSession, body: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        """One try on each router in turn until one answers (any status)."""
        import aiohttp

        last: RouterUnreachableError | None = None
        for url in self._rotation():
            try:
                async with session.post(
                    f"{url}/v1/completions",
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=max(0.001, deadline - time.monotonic())),
                ) as response:
                    payload = await response.read()
                    if response.status != 200:
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                        raise KVRouteError(response.status, _message(payload), retry_after)
                    return json.loads(payload)
            except aiohttp.ClientConnectionError as exc:
                last = RouterUnreachableError(url, exc)
        assert last is not None
        raise last

    async def agenerate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_tokens: int = 16,
        *,
        concurrency: int = 16,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        cache_salts: Sequence[str | None] | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Submit many prompts with at most `concurrency` in flight; results in order.

        `lora_name` applies to every prompt; the salt is `cache_salts[i]` when given,
        else `cache_salt` for all."""
        import aiohttp
        from tqdm import tqdm

        semaphore = asyncio.Semaphore(concurrency)
        results: list[dict[str, Any]] = [{} for _ in prompts]
        salts = cache_salts or [cache_salt] * len(prompts)
        if len(salts) != len(prompts):
            raise ValueError(f"{len(salts)} cache salts for {len(prompts)} prompts")
        with tqdm(total=len(prompts), desc="requests", unit="req", disable=not progress) as bar:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency)
            ) as session:

                async def one(i: int) -> None:
                    async with semaphore:
                        results[i] = await self.agenerate(
                            prompts[i],
                            max_tokens,
                            lora_name=lora_name,
                            cache_salt=salts[i],
                            session=session,
                        )
                        bar.update()

                await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return results

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 16, **kwargs: Any
    ) -> list[dict[str, Any]]:
        return asyncio.run(self.agenerate_batch(prompts, max_tokens, **kwargs))


def _message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return payload.decode(errors="replace")
