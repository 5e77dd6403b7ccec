"""The front door against slow and numerous clients, over real sockets: a header
deadline (slowloris) and a connection cap. Every wait has a deadline; no test asserts
a duration beyond "closed before a generous deadline"."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from kvroute.router.openai.http import HttpOptions, serve_http
from tests.router.test_http_hardening import RefusingBackend

DEADLINE_S = 5.0
HEALTH = b"GET /health/live HTTP/1.1\r\nHost: kvroute\r\n\r\n"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Scenario = Callable[[int, RefusingBackend], Awaitable[None]]


def _serve(scenario: Scenario, **options: Any) -> RefusingBackend:
    """Run `scenario(port, backend)` against a router HTTP server with `options`."""
    backend = RefusingBackend()

    async def main() -> None:
        runner = await serve_http(backend, "127.0.0.1", 0, HttpOptions(**options))  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(scenario(runner.addresses[0][1], backend), 4 * DEADLINE_S)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return backend


async def _connect(port: int) -> Connection:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE_S)


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response (the router's are all Content-Length framed): status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), DEADLINE_S)
    return int(lines[0].split()[1]), body


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed the connection (EOF or reset)."""
    try:
        rest = await asyncio.wait_for(reader.read(), DEADLINE_S)
    except ConnectionError:
        return True
    return reader.at_eof() and rest == b""


async def _trickle_until_closed(connection: Connection, start: bytes) -> bytes:
    """Send `start`, then a header byte every 0.05 s until the server closes; what came back."""
    reader, writer = connection
    writer.write(start)
    received = b""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    while loop.time() < end:
        try:
            writer.write(b"x")
            await writer.drain()
            chunk = await asyncio.wait_for(reader.read(4096), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {DEADLINE_S} s")


async def _attempt(port: int) -> int | None:
    """One request on a new connection: its status, None if the connection failed."""
    reader, writer = await _connect(port)
    try:
        writer.write(HEALTH)
        return (await _response(reader))[0]
    except (ConnectionError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


def test_a_trickled_request_line_is_answered_408_and_closed() -> None:
    async def scenario(port: int, backend: RefusingBackend) -> None:
        received = await _trickle_until_closed(await _connect(port), b"GET /hea")
        # The reply, unless the close raced one of the trickled bytes into a reset.
        assert received == b"" or received.startswith(b"HTTP/1.1 408 Request Timeout")

    backend = _serve(scenario, header_timeout_s=0.3)
    assert backend.responses == [("unmatched", 408, "header_timeout")]


def test_a_slow_but_complete_request_within_the_deadline_is_served() -> None:
    async def scenario(port: int, backend: RefusingBackend) -> None:
        reader, writer = await _connect(port)
        for part in (HEALTH[:10], HEALTH[10:30], HEALTH[30:]):
            writer.write(part)
            await asyncio.sleep(0.05)
        assert (await _response(reader))[0] == 200

    backend = _serve(scenario, header_timeout_s=2.0)
    assert backend.responses == [("/health/live", 200, None)]


def test_keep_alive_idle_time_is_not_a_header_wait_but_the_next_request_is_timed() -> None:
    async def scenario(port: int, backend: RefusingBackend) -> None:
        reader, writer = await _connect(port)
        for _ in range(2):  # the second after idling past the header deadline
            writer.write(HEALTH)
            assert (await _response(reader))[0] == 200
            await asyncio.sleep(0.6)
        await _trickle_until_closed((reader, writer), b"GET /health/live HTTP/1.1\r\n")

    backend = _serve(scenario, header_timeout_s=0.3)
    assert [status for _, status, _ in backend.responses] == [200, 200, 408]


def test_a_body_left_unread_does_not_start_the_next_header_deadline() -> None:
    """A 401 before the body is read: the rest of the body, then idling past the header
    deadline, and the kept-alive connection still serves the next request."""

    async def scenario(port: int, backend: RefusingBackend) -> None:
        reader, writer = await _connect(port)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: kvroute\r\nContent-Length: 2000\r\n\r\n"
        writer.write(head + b" " * 1000)
        assert (await _response(reader))[0] == 401
        writer.write(b" " * 1000)
        await asyncio.sleep(0.6)
        writer.write(HEALTH)
        assert (await _response(reader))[0] == 200

    backend = _serve(scenario, header_timeout_s=0.3, api_keys=frozenset({"sk-right"}))
    assert [status for _, status, _ in backend.responses] == [401, 200]


def test_connections_past_the_cap_are_refused_until_one_closes() -> None:
    async def scenario(port: int, backend: RefusingBackend) -> None:
        first, second = await _connect(port), await _connect(port)
        for reader, writer in (first, second):  # served: surely admitted
            writer.write(HEALTH)
            assert (await _response(reader))[0] == 200
        reader, _ = await _connect(port)
        status, body = await _response(reader)
        assert (status, b'"too_many_connections"' in body) == (503, True)
        assert await _closed(reader)
        second[1].close()
        # The freed place is taken as soon as the server has seen the close.
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE_S
        while await _attempt(port) != 200:
            assert loop.time() < end, "the closed connection's place was never freed"
            await asyncio.sleep(0.05)
        first[1].write(HEALTH)
        assert (await _response(first[0]))[0] == 200

    backend = _serve(scenario, max_connections=2)
    assert ("unmatched", 503, "too_many_connections") in backend.responses


def test_ordinary_clients_are_unaffected() -> None:
    """Pooled keep-alive connections, concurrent requests and a POST body, as before."""

    async def scenario(port: int, backend: RefusingBackend) -> None:
        url = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
        connector = aiohttp.TCPConnector(limit=4)
        async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as session:

            async def get() -> int:
                async with session.get("/health/live") as response:
                    return response.status

            assert await asyncio.gather(*(get() for _ in range(40))) == [200] * 40
            async with session.post("/v1/completions", data=b'{"prompt": 5}') as response:
                assert (response.status, "X-Request-Id" in response.headers) == (400, True)

    backend = _serve(scenario, header_timeout_s=0.5, max_connections=8)
    assert len(backend.responses) == 41


def test_an_idle_kept_alive_connection_is_closed_and_frees_its_place() -> None:
    async def scenario(port: int, backend: RefusingBackend) -> None:
        reader, writer = await _connect(port)
        writer.write(HEALTH)
        assert (await _response(reader))[0] == 200
        assert await _closed(reader)  # idle past keepalive_timeout_s
        writer.close()
        reader, writer = await _connect(port)  # the one place is free again
        writer.write(HEALTH)
        assert (await _response(reader))[0] == 200
        writer.close()

    backend = _serve(scenario, keepalive_timeout_s=0.3, max_connections=1)
    assert [status for _, status, _ in backend.responses] == [200, 200]
