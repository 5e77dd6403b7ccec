"""A replica pushes its load on its event socket: after a step that changed it (once
per step at most), and unchanged as a keepalive while idle; a dead loop goes quiet.
Real ReplicaCore on the simulated executor, real sockets on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import ZmqEventSubscriber
from kvroute.replicas.api import GenerateRequest, ReplicaLoad, SamplingOptions
from kvroute.replicas.clock import RealClock
from kvroute.replicas.factory import build_engine
from kvroute.replicas.serving import ReplicaCore
from kvroute.router.config import load_config
from tests.events.helpers import Collector
from tests.replicas.serve_helpers import tiny_config

pytestmark = pytest.mark.timeout(60)
DEADLINE_S = 30.0


@pytest.fixture
def publisher() -> Iterator[ZmqEventPublisher]:
    made = ZmqEventPublisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint=None))
    yield made
    made.close()


@pytest.fixture
def collector(publisher: ZmqEventPublisher) -> Iterator[Collector]:
    collected = Collector()
    subscriber = ZmqEventSubscriber(
        collected.on_batch, collected.on_resync, on_load=collected.on_load
    )
    subscriber.start()
    subscriber.add_source(SourceSpec("replica-0", publisher.endpoint, start_seq=None, loads=True))
    yield collected
    subscriber.stop()


def _core(tmp_path: Path, keepalive_s: float, step_s: float = 0.0) -> ReplicaCore:
    settings = load_config(tiny_config(tmp_path, step_s=step_s)).replica_settings()
    return ReplicaCore(
        "replica-0", build_engine(settings, RealClock()), load_keepalive_s=keepalive_s
    )


def _request(i: int) -> GenerateRequest:
    return GenerateRequest(
        f"r{i}", [10 + i, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=6, sampling=SamplingOptions()
    )


async def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def test_an_idle_replica_pushes_its_unchanged_load_as_a_keepalive_then_its_changes(
    tmp_path: Path, publisher: ZmqEventPublisher, collector: Collector
) -> None:
    core = _core(tmp_path, keepalive_s=0.05, step_s=0.002)

    async def scenario() -> tuple[list[ReplicaLoad], ReplicaLoad]:
        core.start(publisher)
        try:
            await _until(lambda: len(collector.loads_of("replica-0")) >= 3, "three keepalives")
            idle = collector.loads_of("replica-0")
            assert core.steps == 0
            await asyncio.gather(*(core.generate(_request(i)) for i in range(3)))
            after = core.load()
            await _until(lambda: collector.loads_of("replica-0")[-1] == after, "the idle load")
            return idle, after
        finally:
            await core.stop()

    idle, after = asyncio.run(scenario())
    assert set(idle) == {ReplicaLoad()}
    loads = collector.loads_of("replica-0")
    assert any(load.running_seqs == 3 for load in loads), loads
    assert after.num_cached_blocks > 0 and after.active_seqs == 0


def test_a_replica_pushes_its_load_at_most_once_per_step_and_only_when_it_changed(
    tmp_path: Path, publisher: ZmqEventPublisher
) -> None:
    core = _core(tmp_path, keepalive_s=3600.0)  # no keepalive within the test

    async def scenario() -> None:
        core.start(publisher)
        try:
            for wave in range(3):
                await asyncio.gather(*(core.generate(_request(4 * wave + i)) for i in range(4)))
        finally:
            await core.stop()

    asyncio.run(scenario())
    # One push at start (the idle load), then at most one after each step; the last
    # step left the idle load, so going idle pushed nothing more.
    assert core.steps >= 6 * 3
    assert 2 <= core.loads_pushed <= core.steps + 1
    publisher.close()
    stats = publisher.stats
    assert stats.loads_sent + stats.loads_replaced == core.loads_pushed


def test_a_push_that_fails_kills_the_loop_so_the_replica_falls_silent(
    tmp_path: Path, publisher: ZmqEventPublisher
) -> None:
    """Only the serving loop pushes: a keepalive into a closed publisher is a fault of
    the loop (death logged, `on_death` run), never a silent side task."""
    core = _core(tmp_path, keepalive_s=0.02)
    deaths: list[str] = []
    core.on_death = lambda: deaths.append(core.replica_id)

    async def scenario() -> None:
        core.start(publisher)
        await _until(lambda: core.loads_pushed >= 2, "a keepalive")
        publisher.close()
        await _until(lambda: not core.serving, "the loop to die")

    asyncio.run(scenario())
    assert deaths == ["replica-0"]
    assert str(core.death) == "publisher is closed"
