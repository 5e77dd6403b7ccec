"""The clients: a workload's sessions, `concurrency` at a time, streamed completions.

TTFT is the time to the first chunk that carries text (vLLM streams one chunk per
token); end-to-end is to `[DONE]`. A request fails on a non-200 status, an error
event in the stream, no `[DONE]`, or the deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from kvroute.benchmarks.peers.workloads import Workload

REQUEST_DEADLINE_S = 120.0


@dataclass
class Outcome:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    cached_tokens: int = 0
    error: str = ""  # why it failed: "HTTP 503", "error event", "no [DONE]", ...


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> Outcome:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, cached, done = 0.0, 0, False
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                return Outcome(False, error=f"HTTP {response.status}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Outcome(False, error="error event")
                if not ttft and chunk.get("choices"):
                    ttft = time.perf_counter() - started
                details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens") or cached
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        return Outcome(False, error=type(exc).__name__)
    if not done or not ttft:
        return Outcome(False, error="no [DONE]" if not done else "no tokens")
    return Outcome(True, ttft, time.perf_counter() - started, cached)


async def run_workload(
    workload: Workload, model: str, target: Callable[[int], str], concurrency: int
) -> list[Outcome]:
    """Every session of `workload`, `concurrency` sessions at a time, turns in order;
    request i (in dispatch order) goes to `target(i)`."""
    outcomes: list[Outcome] = []
    pending = list(reversed(workload.sessions))
    dispatched = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_DEADLINE_S)
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            nonlocal dispatched
            while pending:
                turns = pending.pop()
                for prompt in turns:
                    url = target(dispatched)
                    dispatched += 1
                    outcomes.append(await _one(session, url, model, prompt, workload.max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes
