"""A reverse proxy in front of a real engine, for what the router asks it: counts
each path it relays, and can answer `/metrics` late."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from aiohttp import web


async def engine_proxy(
    engine_url: str, metrics_delay_s: float = 0.0, seen: Counter[str] | None = None
) -> web.AppRunner:
    """A proxy to `engine_url`, set up (start a site on it): `/metrics` answers
    `metrics_delay_s` late, as a busy API server does; `seen` counts every path."""
    session = aiohttp.ClientSession()

    async def relay(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen[request.path] += 1
        if request.path == "/metrics":
            await asyncio.sleep(metrics_delay_s)
        async with session.request(
            request.method, engine_url + request.path_qs, data=await request.read()
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for piece in upstream.content.iter_any():
                await response.write(piece)
            await response.write_eof()
            return response

    async def close(_: web.Application) -> None:
        await session.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    app.on_cleanup.append(close)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner
