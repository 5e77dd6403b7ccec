"""The data plane: `ZmqReplica` (router side) against a real `DataServer` serving a
real `ReplicaCore`, over loopback sockets, CURVE as the replica actors run it.

The Ray handle a `ZmqReplica` composes is used only for load, snapshots and health,
none of which these tests call: it is given no actor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvroute.events.curve import CurveKeyPair, CurveServerConfig
from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    RequestAbortedError,
    SamplingOptions,
    StreamChunk,
)
from kvroute.replicas.clock import RealClock
from kvroute.replicas.data_server import DataServer
from kvroute.replicas.data_wire import CHUNK, ERROR, GENERATE, GENERATE_WHOLE, ErrorFrame
from kvroute.replicas.factory import build_engine
from kvroute.replicas.serving import ReplicaCore
from kvroute.router.config import load_config
from kvroute.router.engines.backends import ReplicaUnavailableError
from kvroute.router.engines.ray_replica import RayReplica
from kvroute.router.engines.zmq_replica import ZmqReplica
from tests.replicas.serve_helpers import tiny_config

DEADLINE_S = 10.0
T = TypeVar("T")


def _core(tmp_path: Path, step_s: float = 0.0) -> ReplicaCore:
    settings = load_config(tiny_config(tmp_path, step_s=step_s)).replica_settings()
    return ReplicaCore("replica-0", build_engine(settings, RealClock()))


def _seeded(request_id: str, max_tokens: int = 8, **sampling: object) -> GenerateRequest:
    options = {"temperature": 1.0, "seed": 7, "ignore_eos": True, **sampling}
    return GenerateRequest(
        request_id,
        [5, 6, 7, 8, 9, 10, 11, 12, 13],
        max_tokens,
        sampling=SamplingOptions(**options),  # type: ignore[arg-type]
    )


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            await asyncio.sleep(0.005)


async def _within(work: Awaitable[T]) -> T:
    return await asyncio.wait_for(work, DEADLINE_S)


@asynccontextmanager
async def _served(
    core: ReplicaCore, router: CurveKeyPair | None = None, client: CurveKeyPair | None = None
) -> AsyncIterator[tuple[DataServer, ZmqReplica]]:
    """A started core behind a DataServer, and a ZmqReplica connected to it. With
    `router`, the server is CURVE and accepts only that key; the client uses
    `client` (the router's keys unless given)."""
    core.start(None)
    server_keys = CurveKeyPair.generate()
    curve = CurveServerConfig(server_keys, frozenset({router.public_key})) if router else None
    server = DataServer(core, "tcp://127.0.0.1:*", curve)
    server.start()
    keys = (client or router) if router else None
    backend = ZmqReplica(
        RayReplica(None),
        server.endpoint,
        keys,
        server_keys.public_key if router else None,
        connect_timeout_s=1.0,
    )
    try:
        yield server, backend
    finally:
        await backend.close()
        server.close()
        await core.stop()


async def _collect(items: AsyncIterator[StreamChunk | GenerateResult]) -> list[object]:
    return [item async for item in items]


def _comparable(items: list[object]) -> list[object]:
    """Chunks as they are; a result without its timings."""
    return [
        msgspec.structs.replace(item, queue_s=0.0, ttft_s=0.0, latency_s=0.0)
        if isinstance(item, GenerateResult)
        else item
        for item in items
    ]


def test_a_streamed_generation_over_curve_equals_the_replicas_own_stream(tmp_path: Path) -> None:
    async def run() -> tuple[list[object], list[object]]:
        direct_core = _core(tmp_path)
        direct_core.start(None)
        try:
            direct = await _within(_collect(direct_core.generate_stream(_seeded("r-1"))))
        finally:
            await direct_core.stop()
        async with _served(_core(tmp_path), router=CurveKeyPair.generate()) as (_, backend):
            relayed = await _within(_collect(backend.generate_stream(_seeded("r-1"))))
            result = await _within(backend.generate(_seeded("r-2")))
            assert (len(result.output_token_ids), result.finish_reason) == (8, "length")
            assert backend.pending == 0
        return direct, relayed

    direct, relayed = asyncio.run(run())
    assert len(relayed) == 9  # a chunk per token, then the result
    assert _comparable(relayed) == _comparable(direct)


def test_an_invalid_request_is_answered_with_the_ray_paths_exception(tmp_path: Path) -> None:
    async def run() -> InvalidRequestError:
        async with _served(_core(tmp_path)) as (_, backend):
            with pytest.raises(InvalidRequestError) as caught:
                await _within(backend.generate(_seeded("bad", temperature=5.0)))
            return caught.value

    error = asyncio.run(run())
    assert error.param == "temperature"
    assert str(error) == "temperature must be a number in [0, 2]"


def test_an_abort_stops_the_request_in_the_replica(tmp_path: Path) -> None:
    async def run() -> None:
        core = _core(tmp_path, step_s=0.01)
        async with _served(core) as (server, backend):
            items = backend.generate_stream(_seeded("long", max_tokens=900))
            first = await _within(anext(items))
            assert isinstance(first, StreamChunk)
            assert core.in_flight == 1
            backend.abort("long")
            with pytest.raises(RequestAbortedError):
                await _within(anext(items))
            await _until(lambda: core.in_flight == 0 and server.streaming == 0)
            assert not core.engine.has_work

    asyncio.run(run())


def test_malformed_frames_are_counted_and_dropped_and_the_server_serves_on(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        async with _served(_core(tmp_path)) as (server, backend):
            raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            raw.linger = 0
            raw.connect(server.endpoint)
            try:
                await raw.send_multipart([GENERATE, b"\xc1 not msgpack"])
                await raw.send_multipart([b"Z", b""])
                await raw.send_multipart([GENERATE])
                await raw.send_multipart([GENERATE, msgspec.msgpack.encode({"no": "request"})])
                await _until(lambda: server.malformed == 4)
            finally:
                raw.close()
            result = await _within(backend.generate(_seeded("after")))
            assert len(result.output_token_ids) == 8

    asyncio.run(run())


def test_malformed_replies_are_counted_and_dropped_and_an_error_frame_ends_the_request() -> None:
    async def run() -> int:
        replica = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        replica.linger = 0
        replica.bind("tcp://127.0.0.1:*")
        backend = ZmqReplica(RayReplica(None), replica.last_endpoint.decode())
        try:
            call = asyncio.ensure_future(backend.generate(_seeded("r-9")))
            peer, kind, _ = await _within(replica.recv_multipart())
            assert kind == GENERATE_WHOLE  # generate() asks for the result alone
            await replica.send_multipart([peer, CHUNK, b"r-9", b"\xc1"])
            await replica.send_multipart([peer, b"Z", b"r-9", b""])
            await replica.send_multipart([peer, CHUNK])
            frame = msgspec.msgpack.encode(ErrorFrame("invalid", "prompt is empty", "prompt"))
            await replica.send_multipart([peer, ERROR, b"r-9", frame])
            with pytest.raises(InvalidRequestError, match=r"^prompt is empty$"):
                await _within(call)
            return backend.malformed
        finally:
            await backend.close()
            replica.close()

    assert asyncio.run(run()) == 3


def test_a_server_that_goes_away_fails_its_pending_requests_as_unavailable(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        core = _core(tmp_path, step_s=0.01)
        async with _served(core) as (server, backend):
            items = backend.generate_stream(_seeded("cut", max_tokens=900))
            await _within(anext(items))
            server.close()
            with pytest.raises(ReplicaUnavailableError, match="dropped"):
                await _within(anext(items))
            assert backend.pending == 0
            with pytest.raises(ReplicaUnavailableError, match="is closed"):
                await _within(backend.generate(_seeded("later")))

    asyncio.run(run())


def test_closing_the_backend_fails_its_pending_requests_as_unavailable(tmp_path: Path) -> None:
    async def run() -> None:
        async with _served(_core(tmp_path, step_s=0.01)) as (_, backend):
            items = backend.generate_stream(_seeded("held", max_tokens=900))
            await _within(anext(items))
            await backend.close()
            with pytest.raises(ReplicaUnavailableError, match="removed"):
                await _within(anext(items))
            with pytest.raises(ReplicaUnavailableError, match="closed"):
                await _within(backend.generate(_seeded("after-close")))

    asyncio.run(run())


def test_a_client_whose_key_the_replica_does_not_accept_gets_nothing(tmp_path: Path) -> None:
    async def run() -> None:
        core = _core(tmp_path)
        stranger = CurveKeyPair.generate()
        async with _served(core, router=CurveKeyPair.generate(), client=stranger) as (
            server,
            backend,
        ):
            with pytest.raises(ReplicaUnavailableError, match="no data connection"):
                await _within(backend.generate(_seeded("intruder")))
            assert server.streaming == 0
            assert core.steps == 0
            assert not core.engine.has_work

    asyncio.run(run())


def test_many_concurrent_streams_on_one_connection_all_finish(tmp_path: Path) -> None:
    """Sends and receives interleave on both sockets; none may leave a reader asleep."""

    async def run() -> list[int]:
        async with _served(_core(tmp_path, step_s=0.001)) as (_, backend):

            async def staggered(i: int) -> GenerateResult:
                await asyncio.sleep(i * 0.002)  # arrivals interleave with replies
                return await backend.generate(_seeded(f"c-{i}"))

            results = await _within(asyncio.gather(*(staggered(i) for i in range(64))))
            return [len(result.output_token_ids) for result in results]

    assert asyncio.run(run()) == [8] * 64
