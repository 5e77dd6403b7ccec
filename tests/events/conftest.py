"""Fixtures for the event stream tests: loopback transports, publishers, subscribers."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.events.subscriber import SubscriberConfig, ZmqEventSubscriber
from tests.events.helpers import FAST_RECOVERY, Collector, ScriptedPublisher, Transport


@pytest.fixture
def ipc_dir() -> Iterator[str]:
    # Short on purpose: ipc paths are limited to about 100 bytes.
    path = tempfile.mkdtemp(prefix="kv", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["tcp", "ipc"])
def transport(request: pytest.FixtureRequest, ipc_dir: str) -> Transport:
    if request.param == "tcp":
        return "tcp://127.0.0.1:*"
    return f"ipc://{ipc_dir}/{{name}}"


@pytest.fixture
def make_publisher() -> Iterator[Callable[..., ZmqEventPublisher]]:
    made: list[ZmqEventPublisher] = []
    names = itertools.count()

    def make(transport: Transport, *, start: bool = True, **config: Any) -> ZmqEventPublisher:
        n = next(names)
        publisher = ZmqEventPublisher(
            PublisherConfig(
                endpoint=transport.format(name=f"pub{n}"),
                replay_endpoint=transport.format(name=f"replay{n}"),
                **config,
            )
        )
        made.append(publisher)
        if start:
            publisher.start()
        return publisher

    yield make
    for publisher in made:
        publisher.close()


@pytest.fixture
def make_scripted() -> Iterator[Callable[..., ScriptedPublisher]]:
    made: list[ScriptedPublisher] = []

    def make(transport: Transport, **options: Any) -> ScriptedPublisher:
        publisher = ScriptedPublisher(transport, **options)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.close()


@pytest.fixture
def make_subscriber() -> Iterator[Callable[..., tuple[ZmqEventSubscriber, Collector]]]:
    made: list[ZmqEventSubscriber] = []

    def make(
        collector: Collector | None = None, **config: Any
    ) -> tuple[ZmqEventSubscriber, Collector]:
        collector = collector or Collector()
        config.setdefault("recovery", FAST_RECOVERY)
        subscriber = ZmqEventSubscriber(
            collector.on_batch, collector.on_resync, SubscriberConfig(**config), collector.on_load
        )
        made.append(subscriber)
        subscriber.start()
        return subscriber, collector

    yield make
    for subscriber in made:
        subscriber.stop()
