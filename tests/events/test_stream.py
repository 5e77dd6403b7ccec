"""Publisher -> subscriber over tcp and ipc: ordered, exactly once, many sources."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import zmq

from kvroute.events.kv_events import KVEventBatch, encode_batch
from kvroute.events.publisher import ZmqEventPublisher
from kvroute.events.sequencer import RecoveryConfig, SourceState
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import ZmqEventSubscriber
from tests.events.helpers import (
    Collector,
    ScriptedPublisher,
    Transport,
    batch_number,
    numbered_batch,
    spec_for,
    wait_exact,
    wait_until,
)
from tests.events.vectors import golden_batch

pytestmark = pytest.mark.timeout(60)

MakePublisher = Callable[..., ZmqEventPublisher]
MakeSubscriber = Callable[..., tuple[ZmqEventSubscriber, Collector]]
MakeScripted = Callable[..., ScriptedPublisher]

NOBODY = "tcp://127.0.0.1:9"  # nothing listens here; connecting is legal and harmless


def test_every_batch_arrives_once_in_order_with_its_content(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber, transport: Transport
) -> None:
    publisher = make_publisher(transport)
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", publisher))
    for n in range(500):
        publisher.publish(numbered_batch(n, events=4))
    assert collector.wait_seqs("r0", 500) == list(range(500))
    assert [batch_number(batch) for _, batch in collector.delivered["r0"]] == list(range(500))
    stats = wait_exact(subscriber, "r0")
    assert (stats.state, stats.next_seq, stats.batches, stats.events) == (
        SourceState.EXACT,
        500,
        500,
        2_000,
    )
    assert (stats.resyncs, stats.malformed, stats.callback_errors) == (0, 0, 0)
    assert stats.last_seen is not None and stats.last_batch_ts == 499.0


def test_the_golden_batch_arrives_equal_to_what_was_published(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*")
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", publisher))
    publisher.publish(golden_batch())
    collector.wait_seqs("r0", 1)
    assert collector.delivered["r0"] == [(0, golden_batch())]


def test_several_publishers_feed_one_subscriber_each_in_order(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber, ipc_dir: str
) -> None:
    publishers = {
        "tcp-a": make_publisher("tcp://127.0.0.1:*"),
        "tcp-b": make_publisher("tcp://127.0.0.1:*"),
        "ipc-a": make_publisher(f"ipc://{ipc_dir}/a-{{name}}"),
        "ipc-b": make_publisher(f"ipc://{ipc_dir}/b-{{name}}"),
    }
    subscriber, collector = make_subscriber()
    for name, publisher in publishers.items():
        subscriber.add_source(spec_for(name, publisher))
    for n in range(300):
        for k, publisher in enumerate(publishers.values()):
            publisher.publish(numbered_batch(k * 1_000 + n))
    for k, name in enumerate(publishers):
        assert collector.wait_seqs(name, 300) == list(range(300))
        numbers = [batch_number(batch) for _, batch in collector.delivered[name]]
        assert numbers == [k * 1_000 + n for n in range(300)]
    for name in publishers:
        assert wait_exact(subscriber, name).batches == 300
    assert list(subscriber.all_stats()) == list(publishers)


def test_sources_can_be_added_and_removed_while_running(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber
) -> None:
    first = make_publisher("tcp://127.0.0.1:*")
    second = make_publisher("tcp://127.0.0.1:*")
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("first", first))
    first.publish(numbered_batch(0))
    collector.wait_seqs("first", 1)
    subscriber.remove_source("first")
    subscriber.add_source(spec_for("second", second))  # applied after the removal
    second.publish(numbered_batch(0))
    collector.wait_seqs("second", 1)
    first.publish(numbered_batch(1))
    second.publish(numbered_batch(1))
    collector.wait_seqs("second", 2)
    assert collector.seqs("first") == [0]
    assert list(subscriber.all_stats()) == ["second"]
    with pytest.raises(KeyError):
        subscriber.stats("first")


def test_a_source_name_is_unique(make_subscriber: MakeSubscriber) -> None:
    subscriber, _ = make_subscriber()
    spec = SourceSpec("r0", NOBODY, NOBODY)
    subscriber.add_source(spec)
    with pytest.raises(ValueError, match="already added"):
        subscriber.add_source(spec)


def test_a_bad_endpoint_fails_in_add_source(make_subscriber: MakeSubscriber) -> None:
    subscriber, _ = make_subscriber()
    with pytest.raises(zmq.ZMQError, match="Protocol not supported"):
        subscriber.add_source(SourceSpec("r0", "bogus://x", NOBODY))
    assert subscriber.all_stats() == {}


def test_a_raising_callback_is_counted_and_delivery_goes_on(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber
) -> None:
    class FailsOnSeqOne(Collector):
        def on_batch(self, source: str, seq: int, batch: KVEventBatch) -> None:
            if seq == 1:
                raise RuntimeError("consumer bug")
            super().on_batch(source, seq, batch)

    publisher = make_publisher("tcp://127.0.0.1:*")
    subscriber, collector = make_subscriber(FailsOnSeqOne())
    subscriber.add_source(spec_for("r0", publisher))
    for n in range(3):
        publisher.publish(numbered_batch(n))
    assert collector.wait_seqs("r0", 2) == [0, 2]
    stats = subscriber.stats("r0")
    assert (stats.callback_errors, stats.batches, subscriber.loop_errors) == (1, 3, 0)


def test_a_new_vllm_publisher_that_sends_topic_frames_in_replays_is_recovered(
    make_scripted: MakeScripted, make_subscriber: MakeSubscriber
) -> None:
    publisher = make_scripted("tcp://127.0.0.1:*", reply_with_topic=True)
    subscriber, collector = make_subscriber(recovery=RecoveryConfig(idle_probe_s=None))
    subscriber.add_source(spec_for("r0", publisher))
    publisher.wait_subscribed()
    for seq in range(6):
        publisher.publish_batch(seq, live=seq not in (2, 3))
    assert collector.wait_seqs("r0", 6) == list(range(6))
    assert subscriber.stats("r0").gaps == 1


def test_stop_is_idempotent_and_an_unstarted_subscriber_stops_cleanly() -> None:
    collector = Collector()
    subscriber = ZmqEventSubscriber(collector.on_batch, collector.on_resync)
    subscriber.add_source(SourceSpec("r0", NOBODY, NOBODY))
    subscriber.stop()
    subscriber.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        subscriber.add_source(SourceSpec("r1", NOBODY, NOBODY))


def test_publishing_an_encoded_payload_equals_publishing_the_batch(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*")
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", publisher))
    publisher.publish_payload(encode_batch(golden_batch()))
    publisher.publish(golden_batch())
    collector.wait_seqs("r0", 2)
    assert [batch for _, batch in collector.delivered["r0"]] == [golden_batch()] * 2
    wait_until(lambda: subscriber.stats("r0").next_seq == 2, "next seq 2")
