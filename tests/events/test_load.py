"""Load messages: kvroute's replicas push their `ReplicaLoad` on the event socket,
under their own topic, beside vLLM's batches, which stay as they were."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq

from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.frames import LOAD_TOPIC, pack_seq
from kvroute.events.kv_events import encode_batch
from kvroute.events.load import MAX_LOAD_BYTES, ReplicaLoad, decode_load, encode_load
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.events.subscriber import ZmqEventSubscriber
from tests.events.helpers import (
    WAIT_S,
    Collector,
    ScriptedPublisher,
    Transport,
    numbered_batch,
    spec_for,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

MakeSubscriber = Callable[..., tuple[ZmqEventSubscriber, Collector]]
BUSY = ReplicaLoad(
    queued_prefill_tokens=96, running_seqs=3, kv_usage=0.25, waiting_seqs=2, num_cached_blocks=7
)


def _packed(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_a_load_decodes_to_what_was_encoded_and_unknown_fields_are_ignored() -> None:
    assert decode_load(encode_load(BUSY)) == BUSY
    assert decode_load(_packed({"running_seqs": 2, "added_later": [1]})) == ReplicaLoad(
        running_seqs=2
    )


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\xc1", MalformedKind.NOT_MSGPACK),
        (_packed([1, 2, 3]), MalformedKind.WRONG_TYPE),
        (_packed({"running_seqs": "3"}), MalformedKind.WRONG_TYPE),
        (_packed({"running_seqs": True}), MalformedKind.WRONG_TYPE),
        (_packed({"waiting_seqs": -1}), MalformedKind.BAD_VALUE),
        (_packed({"kv_usage": 1.5}), MalformedKind.BAD_VALUE),
        (_packed({"kv_usage": float("nan")}), MalformedKind.BAD_VALUE),
        (
            _packed({"num_cached_blocks": 1, "pad": "x" * MAX_LOAD_BYTES}),
            MalformedKind.OVERSIZED_PAYLOAD,
        ),
    ],
)
def test_a_bad_load_is_malformed_input_of_its_kind(payload: bytes, kind: MalformedKind) -> None:
    with pytest.raises(MalformedInputError) as caught:
        decode_load(payload)
    assert caught.value.kind is kind


def test_the_load_topic_cannot_be_the_events_topic() -> None:
    with pytest.raises(ValueError, match="reserved for load messages"):
        ZmqEventPublisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", topic="kvroute.load"))


def test_a_load_goes_out_as_topic_and_payload_and_batches_keep_vllms_frames(
    ctx: zmq.Context,
) -> None:
    publisher = ZmqEventPublisher(
        PublisherConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint=None, topic="kv")
    )
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    sub.connect(publisher.endpoint)
    with publisher:
        # A SUB may join after the first sends: push until one load has come through.
        for _ in range(200):
            publisher.publish_load(ReplicaLoad())
            if sub.poll(50):
                break
        while sub.poll(200):
            sub.recv_multipart()
        publisher.publish(numbered_batch(1))
        publisher.publish_load(BUSY)
        frames = [sub.recv_multipart() for _ in range(2) if sub.poll(int(WAIT_S * 1000))]
    # The sender thread takes queued batches and the latest load on each wake, so a
    # load may overtake a batch published just before it: order is not promised.
    assert sorted(frames) == [
        [b"kv", pack_seq(0), encode_batch(numbered_batch(1))],
        [LOAD_TOPIC, encode_load(BUSY)],
    ]
    assert publisher.next_seq == 1  # loads take no seq


def test_loads_given_before_the_sender_runs_coalesce_to_the_latest() -> None:
    publisher = ZmqEventPublisher(
        PublisherConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint=None)
    )
    for running in range(1, 4):
        publisher.publish_load(ReplicaLoad(running_seqs=running))
    assert publisher.stats.loads_replaced == 2
    with publisher:
        wait_until(lambda: publisher.stats.loads_sent == 1, "the one load to go out")
    assert (publisher.stats.loads_sent, publisher.stats.loads_replaced) == (1, 2)


def test_the_subscriber_delivers_loads_beside_ordered_batches_without_taking_a_seq(
    make_publisher: Callable[..., ZmqEventPublisher],
    make_subscriber: MakeSubscriber,
    transport: Transport,
) -> None:
    publisher = make_publisher(transport, topic="kv")
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", publisher, topic="kv", loads=True))
    # Join first, by loads alone: they take no seq, so batch 0 is still to come.
    first = ReplicaLoad(num_cached_blocks=1)

    def pushed_and_arrived() -> bool:
        publisher.publish_load(first)
        return bool(collector.loads_of("r0"))

    wait_until(pushed_and_arrived, "a first load through a topic other than the events'")
    for n in range(3):
        publisher.publish(numbered_batch(n))
    publisher.publish_load(BUSY)
    collector.wait_for(lambda: BUSY in collector.loads_of("r0"), "the busy load")
    assert collector.wait_seqs("r0", 3) == [0, 1, 2]
    assert set(collector.loads_of("r0")) == {first, BUSY}
    stats = subscriber.stats("r0")
    assert (stats.gaps, stats.malformed, stats.loads) == (0, 0, len(collector.loads_of("r0")))


def test_bad_load_messages_are_counted_by_kind_and_dropped(
    make_scripted: Callable[..., ScriptedPublisher],
    make_subscriber: MakeSubscriber,
    transport: Transport,
) -> None:
    scripted = make_scripted(transport)
    subscriber, collector = make_subscriber()
    subscriber.add_source(spec_for("r0", scripted, loads=True))
    scripted.wait_subscribed()
    scripted.send_raw([LOAD_TOPIC])
    scripted.send_raw([LOAD_TOPIC, encode_load(BUSY), b""])
    scripted.publish_batch(0)
    scripted.send_raw([LOAD_TOPIC, b"\xc1"])
    scripted.send_raw([LOAD_TOPIC, _packed({"running_seqs": -2})])
    scripted.publish_batch(1)
    scripted.send_raw([LOAD_TOPIC, encode_load(BUSY)])
    collector.wait_for(lambda: bool(collector.loads_of("r0")), "the good load")
    assert collector.loads == [("r0", BUSY)]
    assert collector.seqs("r0") == [0, 1]
    stats = subscriber.stats("r0")
    assert stats.loads == 1
    assert stats.malformed == 4
    assert {kind: n for kind, n in stats.malformed_by_kind.items() if n} == {
        MalformedKind.FRAME_COUNT: 2,
        MalformedKind.NOT_MSGPACK: 1,
        MalformedKind.BAD_VALUE: 1,
    }
    assert (stats.gaps, stats.callback_errors, subscriber.loop_errors) == (0, 0, 0)
