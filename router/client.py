"""Python client for the router's HTTP API (sync, async, and batches)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
from tqdm import tqdm


class KVRouteError(RuntimeError):
    """The router answered with an error; `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


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
    section naming the replica and its cached tokens."""

    def __init__(self, base_url: str, timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> dict[str, Any]:
        data = json.dumps(_body(prompt, max_tokens, lora_name, cache_salt)).encode()
        request = urllib.request.Request(
            f"{self.base_url}/v1/completions",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise KVRouteError(exc.code, _message(exc.read())) from None

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield server-sent chunks: token deltas, then the final chunk with usage."""
        body = {**_body(prompt, max_tokens, lora_name, cache_salt), "stream": True}
        request = urllib.request.Request(
            f"{self.base_url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
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
        except urllib.error.HTTPError as exc:
            raise KVRouteError(exc.code, _message(exc.read())) from None

    def get_json(self, path: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(
                f"{self.base_url}{path}", timeout=self.timeout_s
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise KVRouteError(exc.code, _message(exc.read())) from None

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
        if session is None:
            async with aiohttp.ClientSession() as own:
                return await self.agenerate(
                    prompt, max_tokens, lora_name=lora_name, cache_salt=cache_salt, session=own
                )
        async with session.post(
            f"{self.base_url}/v1/completions",
            json=_body(prompt, max_tokens, lora_name, cache_salt),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        ) as response:
            payload = await response.read()
            if response.status != 200:
                raise KVRouteError(response.status, _message(payload))
            return json.loads(payload)

    async def agenerate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_tokens: int = 16,
        *,
        concurrency: int = 16,
        cache_salts: Sequence[str | None] | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Submit many prompts with at most `concurrency` in flight; results in order."""
        semaphore = asyncio.Semaphore(concurrency)
        results: list[dict[str, Any]] = [{} for _ in prompts]
        salts = cache_salts or [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=not progress)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency)
        ) as session:

            async def one(i: int) -> None:
                async with semaphore:
                    results[i] = await self.agenerate(
                        prompts[i], max_tokens, cache_salt=salts[i], session=session
                    )
                    bar.update()

            await asyncio.gather(*(one(i) for i in range(len(prompts))))
        bar.close()
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
