"""The floor of a Python router: an aiohttp reverse proxy that sends each request to
the next engine in turn and relays the engine's bytes back as they come, parsing
nothing. The peers harness runs it as the `relay` path, so a table shows what any
router on this stack pays per request before it routes anything.

Run: python -m benchmarks.peers.relay --port PORT --engines URL [URL ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

# Headers that describe one hop's connection, not the response.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(engine_urls: list[str]) -> web.Application:
    engines = itertools.cycle(engine_urls)
    app = web.Application()

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        yield
        await app[SESSION].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app[SESSION]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        url = f"{next(engines)}{request.path_qs}"
        async with session.request(request.method, url, data=body, headers=headers) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS},
            )
            await response.prepare(request)
            # A client that has read its `[DONE]` may close before the last chunk.
            with contextlib.suppress(ConnectionResetError):
                async for piece in upstream.content.iter_any():
                    await response.write(piece)
                await response.write_eof()
            return response

    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engines", nargs="+", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(build_app(args.engines), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
