"""Faults end to end: lost batches come back exactly once, and what cannot come back is reported."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from kvroute.events.errors import MalformedKind
from kvroute.events.frames import pack_seq
from kvroute.events.kv_events import DecodeLimits, encode_batch
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.events.sequencer import RecoveryConfig, ResyncReason, SourceState
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import ZmqEventSubscriber
from tests.events.helpers import (
    WAIT_S,
    Collector,
    ScriptedPublisher,
    Transport,
    batch_number,
    numbered_batch,
    spec_for,
    wait_exact,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

MakePublisher = Callable[..., ZmqEventPublisher]
MakeSubscriber = Callable[..., tuple[ZmqEventSubscriber, Collector]]
MakeScripted = Callable[..., ScriptedPublisher]


def test_injected_drops_end_with_every_batch_exactly_once_in_order(
    make_scripted: MakeScripted, make_subscriber: MakeSubscriber, transport: Transport
) -> None:
    publisher = make_scripted(transport)
    # Idle probes are slow enough not to race the phases, and find the lost tail.
    subscriber, collector = make_subscriber(recovery=RecoveryConfig(idle_probe_s=1.0))
    subscriber.add_source(spec_for("r0", publisher))
    publisher.wait_subscribed()
    phases = [(range(0, 10), {3}), (range(10, 50), {10, 11, 12}), (range(50, 99), {50})]
    phases.append((range(99, 100), {99}))  # a lost tail: only an idle probe can find it
    for seqs, dropped in phases:
        for seq in seqs:
            publisher.publish_batch(seq, live=seq not in dropped)
        collector.wait_seqs("r0", seqs.stop)
        wait_exact(subscriber, "r0")  # so that each phase's loss is a gap of its own
    assert collector.seqs("r0") == list(range(100))
    assert [batch_number(batch) for _, batch in collector.delivered["r0"]] == list(range(100))
    stats = wait_exact(subscriber, "r0")
    assert (stats.state, stats.batches, stats.gaps, stats.resyncs) == (SourceState.EXACT, 100, 4, 0)
    assert stats.replayed >= 6


def test_a_source_repairs_a_dozen_gaps_in_its_life_without_a_resync(
    make_scripted: MakeScripted, make_subscriber: MakeSubscriber, transport: Transport
) -> None:
    # More gaps than replay attempts per gap: the budget is renewed by each repair.
    publisher = make_scripted(transport)
    subscriber, collector = make_subscriber(recovery=RecoveryConfig(idle_probe_s=None))
    subscriber.add_source(spec_for("r0", publisher))
    publisher.wait_subscribed()
    for gap in range(12):
        seqs = range(3 * gap, 3 * gap + 3)
        for seq in seqs:
            publisher.publish_batch(seq, live=seq != seqs[1])
        collector.wait_seqs("r0", seqs.stop)
        wait_exact(subscriber, "r0")
    assert collector.seqs("r0") == list(range(36))
    stats = wait_exact(subscriber, "r0")
    assert (stats.state, stats.batches, stats.gaps, stats.resyncs) == (SourceState.EXACT, 36, 12, 0)
    assert collector.resyncs == []


def test_a_gap_without_a_replay_endpoint_asks_for_a_resync(
    make_scripted: MakeScripted, make_subscriber: MakeSubscriber
) -> None:
    publisher = make_scripted("tcp://127.0.0.1:*")
    subscriber, collector = make_subscriber()
    subscriber.add_source(SourceSpec("r0", publisher.endpoint, replay_endpoint=None))
    publisher.wait_subscribed()
    for seq in (0, 2):
        publisher.publish_batch(seq)
    assert collector.wait_resyncs(1) == [("r0", ResyncReason.REPLAY_UNAVAILABLE)]
    assert collector.seqs("r0") == [0]


def test_resynced_called_from_the_resync_callback_resumes_delivery(
    make_scripted: MakeScripted, make_subscriber: MakeSubscriber
) -> None:
    class ResumesAtOnce(Collector):
        subscriber: ZmqEventSubscriber

        def on_resync(self, source: str, reason: ResyncReason) -> None:
            super().on_resync(source, reason)
            self.subscriber.resynced(source)  # "from whatever comes next"

    publisher = make_scripted("tcp://127.0.0.1:*")
    collector = ResumesAtOnce()
    collector.subscriber, _ = make_subscriber(collector)
    collector.subscriber.add_source(SourceSpec("r0", publisher.endpoint, replay_endpoint=None))
    publisher.wait_subscribed()
    for seq in (0, 2, 3):
        publisher.publish_batch(seq)
    assert collector.wait_seqs("r0", 3) == [0, 2, 3]
    assert collector.resyncs == [("r0", ResyncReason.REPLAY_UNAVAILABLE)]
    assert wait_exact(collector.subscriber, "r0").next_seq == 4


def test_a_replay_buffer_overrun_asks_for_a_resync_then_resumes(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*", buffer_steps=10)
    for n in range(100):
        publisher.publish(numbered_batch(n))
    wait_until(lambda: publisher.stats.sent == 100, "100 batches sent")
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", publisher))  # expects seq 0, long gone
    assert collector.wait_resyncs(1) == [("r0", ResyncReason.REPLAY_RANGE_LOST)]
    assert subscriber.stats("r0").state is SourceState.DEGRADED
    subscriber.resynced("r0", 100)  # the snapshot covers seqs 0..99
    for n in range(100, 105):
        publisher.publish(numbered_batch(n))
    assert collector.wait_seqs("r0", 5) == [100, 101, 102, 103, 104]
    stats = wait_exact(subscriber, "r0")
    assert (stats.next_seq, stats.resyncs) == (105, 1)


def test_a_publisher_restart_asks_for_a_resync_then_resumes(
    make_subscriber: MakeSubscriber, transport: Transport
) -> None:
    config = PublisherConfig(
        endpoint=transport.format(name="pub"), replay_endpoint=transport.format(name="replay")
    )
    first = ZmqEventPublisher(config)
    first.start()
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", first))
    for n in range(50):
        first.publish(numbered_batch(n))
    collector.wait_seqs("r0", 50)
    first.close()
    same_endpoints = PublisherConfig(endpoint=first.endpoint, replay_endpoint=first.replay_endpoint)
    with ZmqEventPublisher(same_endpoints) as second:
        # Until the subscriber reconnects, the new process's first batches are lost;
        # the first it sees has a seq below 50, so its seq went backwards.
        for n in range(49):
            second.publish(numbered_batch(1_000 + n))
            if collector.satisfied_within(lambda: bool(collector.resyncs), timeout_s=0.05):
                break
        assert collector.wait_resyncs(1) == [("r0", ResyncReason.PUBLISHER_RESTARTED)]
        assert subscriber.stats("r0").state is SourceState.DEGRADED
        subscriber.resynced("r0")  # resume from the first batch held since the restart
        for n in range(3):
            second.publish(numbered_batch(2_000 + n))
        collector.wait_for(
            lambda: collector.seqs("r0")[-1:] == [second.next_seq - 1], "the new process's batches"
        )
    after = collector.seqs("r0")[50:]
    assert after == list(range(after[0], second.next_seq))
    assert [batch_number(b) for _, b in collector.delivered["r0"][-3:]] == [2_000, 2_001, 2_002]
    assert wait_exact(subscriber, "r0").resyncs == 1


@pytest.mark.slow
def test_a_slow_subscriber_at_the_hwm_loses_batches_and_recovers_every_one(
    make_publisher: MakePublisher, make_subscriber: MakeSubscriber, transport: Transport
) -> None:
    # 4,000 batches of 11 kB outgrow the high-water marks and every kernel buffer on the
    # way while the subscriber is stuck in its callback, so the PUB socket must drop.
    count = 4_000
    publisher = make_publisher(transport, hwm=10)
    collector = Collector(gate=threading.Event())
    subscriber, _ = make_subscriber(collector, rcvhwm=10)
    subscriber.add_source(spec_for("r0", publisher))
    payload = encode_batch(numbered_batch(0, events=256))
    publisher.publish_payload(payload)
    assert collector.blocked.wait(WAIT_S), "the first batch never reached the callback"
    for _ in range(count - 1):
        publisher.publish_payload(payload)
    wait_until(lambda: publisher.stats.sent == count, f"{count} batches sent")
    assert collector.gate is not None
    collector.gate.set()
    assert collector.wait_seqs("r0", count) == list(range(count))
    stats = wait_exact(subscriber, "r0")
    assert stats.gaps >= 1 and stats.replayed >= 1, "the loss was never detected"
    assert (stats.state, stats.batches, stats.resyncs) == (SourceState.EXACT, count, 0)


def bad_payloads() -> list[tuple[MalformedKind, bytes]]:
    def batch_with(event: Any) -> bytes:
        return msgspec.msgpack.encode([1.0, [event], 0])

    def stored(**changes: Any) -> list[Any]:
        fields = {"block_hashes": [1], "parent": None, "token_ids": [1], "block_size": 1}
        fields.update(changes)
        return ["BlockStored", *fields.values(), None, "GPU", None]

    return [
        (MalformedKind.NOT_MSGPACK, b"\xc1 not msgpack"),
        (MalformedKind.NOT_MSGPACK, encode_batch(numbered_batch(0))[:-3]),
        (MalformedKind.UNKNOWN_TAG, batch_with(["BlockMoved", [1]])),
        (MalformedKind.UNKNOWN_TAG, batch_with({"type": "BlockMoved"})),
        (MalformedKind.WRONG_TYPE, batch_with(stored(block_hashes="1"))),
        (MalformedKind.WRONG_TYPE, batch_with(stored(token_ids=[1.5]))),
        (MalformedKind.BAD_VALUE, batch_with(stored(block_hashes=[-1]))),
        (MalformedKind.BAD_VALUE, batch_with(stored(block_size=2**40))),
        (MalformedKind.TOO_LARGE, batch_with(stored(token_ids=list(range(1_001))))),
        (MalformedKind.TOO_LARGE, batch_with(stored(token_ids=list(range(100_000))))),
    ]


def test_bad_input_is_counted_logged_once_per_kind_and_dropped(
    make_scripted: MakeScripted,
    make_subscriber: MakeSubscriber,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kvroute.events.source")
    publisher = make_scripted("tcp://127.0.0.1:*")
    subscriber, collector = make_subscriber(
        limits=DecodeLimits(max_token_ids=1_000), recovery=RecoveryConfig(idle_probe_s=None)
    )
    subscriber.add_source(spec_for("r0", publisher))
    publisher.wait_subscribed()
    for _ in range(2):
        publisher.send_raw([b"", pack_seq(0)])  # two frames
        publisher.send_raw([b"", pack_seq(0), b"x", b"y"])  # four frames
        publisher.send_raw([b"", b"\x00\x01", b"payload"])  # a truncated seq frame
    payloads = bad_payloads()
    for seq, (_, payload) in enumerate(payloads):
        publisher.publish(seq, payload)
    publisher.publish_batch(len(payloads))
    assert collector.wait_seqs("r0", 1) == [len(payloads)]
    stats = subscriber.stats("r0")
    assert stats.malformed_by_kind == {
        MalformedKind.FRAME_COUNT: 4,
        MalformedKind.TRUNCATED_FRAME: 2,
        MalformedKind.OVERSIZED_PAYLOAD: 0,
        MalformedKind.NOT_MSGPACK: 2,
        MalformedKind.UNKNOWN_TAG: 2,
        MalformedKind.WRONG_TYPE: 2,
        MalformedKind.BAD_VALUE: 2,
        MalformedKind.TOO_LARGE: 2,
    }
    assert (stats.malformed, stats.batches, stats.gaps, stats.resyncs) == (16, 1, 0, 0)
    assert (stats.state, stats.next_seq, subscriber.loop_errors) == (SourceState.EXACT, 11, 0)
    logged = [r.getMessage() for r in caplog.records if "dropped bad input" in r.getMessage()]
    assert len(logged) == 7
    assert sorted(m.split("(")[1].split(":")[0] for m in logged) == sorted(
        kind.value for kind in MalformedKind if kind is not MalformedKind.OVERSIZED_PAYLOAD
    )
