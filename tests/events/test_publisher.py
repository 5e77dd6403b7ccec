"""The publisher speaks vLLM's protocol: PUB frames, replay replies, bounds and shutdown."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest
import zmq

from kvroute.events.frames import END_SEQ, pack_seq
from kvroute.events.kv_events import encode_batch
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from tests.events.helpers import WAIT_S, Transport, numbered_batch, wait_until
from tests.events.vectors import GOLDEN_ARRAY, golden_batch

pytestmark = pytest.mark.timeout(60)

MakePublisher = Callable[..., ZmqEventPublisher]


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def replay_frames(ctx: zmq.Context, endpoint: str, start: int) -> list[list[bytes]]:
    """Ask for a replay from `start` on a fresh DEALER; every reply up to the end marker."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", pack_seq(start)])
    replies: list[list[bytes]] = []
    while not replies or replies[-1][1] != END_SEQ:
        assert dealer.poll(int(WAIT_S * 1000)), f"no replay reply after {replies}"
        replies.append(dealer.recv_multipart())
    dealer.close(linger=0)
    return replies


def test_defaults_are_vllms_on_loopback() -> None:
    config = PublisherConfig()
    assert config.endpoint == "tcp://127.0.0.1:5557"
    assert config.replay_endpoint == "tcp://127.0.0.1:5558"
    assert (config.buffer_steps, config.hwm, config.topic) == (10_000, 100_000, "")


def test_live_frames_are_topic_seq_payload_from_seq_zero(
    make_publisher: MakePublisher, ctx: zmq.Context, transport: Transport
) -> None:
    publisher = make_publisher(transport, topic="kv@r0")
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    sub.connect(publisher.endpoint)
    # A SUB may join after the first sends; publish until it has seen two in a row.
    received: list[list[bytes]] = []
    for _ in range(200):
        publisher.publish(golden_batch())
        if sub.poll(50):
            received.append(sub.recv_multipart())
        if len(received) >= 2:
            break
    first, second = received[:2]
    assert first[0] == b"kv@r0"
    assert first[2] == GOLDEN_ARRAY
    assert len(first) == 3 and len(first[1]) == 8
    assert int.from_bytes(second[1], "big") == int.from_bytes(first[1], "big") + 1
    assert int.from_bytes(first[1], "big") < publisher.next_seq


def test_replay_answers_every_buffered_seq_from_the_start_then_the_end_marker(
    make_publisher: MakePublisher, ctx: zmq.Context, transport: Transport
) -> None:
    publisher = make_publisher(transport)
    payloads = [encode_batch(numbered_batch(n)) for n in range(5)]
    for payload in payloads:
        publisher.publish_payload(payload)
    wait_until(lambda: publisher.stats.sent == 5, "5 batches sent")
    replies = replay_frames(ctx, publisher.replay_endpoint, 2)
    assert replies == [
        [b"", pack_seq(2), payloads[2]],
        [b"", pack_seq(3), payloads[3]],
        [b"", pack_seq(4), payloads[4]],
        [b"", END_SEQ, b""],
    ]
    assert (publisher.stats.replay_requests, publisher.stats.replayed) == (1, 3)


def test_replay_from_beyond_the_newest_seq_is_only_the_end_marker(
    make_publisher: MakePublisher, ctx: zmq.Context
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*")
    publisher.publish(golden_batch())
    wait_until(lambda: publisher.stats.sent == 1, "1 batch sent")
    assert replay_frames(ctx, publisher.replay_endpoint, 1) == [[b"", END_SEQ, b""]]


def test_the_replay_buffer_keeps_only_the_newest_batches(
    make_publisher: MakePublisher, ctx: zmq.Context
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*", buffer_steps=3)
    for n in range(6):
        publisher.publish(numbered_batch(n))
    wait_until(lambda: publisher.stats.sent == 6, "6 batches sent")
    seqs = [reply[1] for reply in replay_frames(ctx, publisher.replay_endpoint, 0)]
    assert seqs == [pack_seq(3), pack_seq(4), pack_seq(5), END_SEQ]


def test_bad_replay_requests_are_counted_and_later_requests_still_served(
    make_publisher: MakePublisher, ctx: zmq.Context
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*")
    publisher.publish(golden_batch())
    wait_until(lambda: publisher.stats.sent == 1, "1 batch sent")
    bad = ctx.socket(zmq.DEALER)
    bad.connect(publisher.replay_endpoint)
    bad.send_multipart([b"", b"\x00\x01"])  # a 2-byte start seq
    bad.send_multipart([b"", pack_seq(0), b"extra"])
    wait_until(lambda: publisher.stats.bad_replay_requests == 2, "2 bad requests counted")
    assert replay_frames(ctx, publisher.replay_endpoint, 0) == [
        [b"", pack_seq(0), GOLDEN_ARRAY],
        [b"", END_SEQ, b""],
    ]
    bad.close(linger=0)


def test_a_full_queue_drops_the_batch_but_consumes_its_seq(
    make_publisher: MakePublisher, ctx: zmq.Context
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*", start=False, max_queue_size=4)
    results = [publisher.publish(numbered_batch(n)) for n in range(6)]
    assert results == [True, True, True, True, False, False]
    assert (publisher.stats.published, publisher.stats.dropped_queue_full) == (6, 2)
    assert publisher.next_seq == 6
    publisher.start()
    wait_until(lambda: publisher.stats.sent == 4, "the 4 queued batches sent")
    publisher.publish(numbered_batch(6))
    wait_until(lambda: publisher.stats.sent == 5, "seq 6 sent")
    seqs = [reply[1] for reply in replay_frames(ctx, publisher.replay_endpoint, 0)]
    assert seqs == [pack_seq(0), pack_seq(1), pack_seq(2), pack_seq(3), pack_seq(6), END_SEQ]


def test_close_sends_what_was_queued_and_stops_the_thread(make_publisher: MakePublisher) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*", start=False)
    for n in range(3):
        publisher.publish(numbered_batch(n))
    publisher.close()
    assert publisher.stats.sent == 3
    started = make_publisher("tcp://127.0.0.1:*")
    started.publish(golden_batch())
    started.close()
    assert started.stats.sent == 1
    assert [t for t in threading.enumerate() if t.name == "kv-event-publisher"] == []


def test_close_is_idempotent_and_publishing_after_it_raises(make_publisher: MakePublisher) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*")
    publisher.close()
    publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(golden_batch())


def test_a_busy_endpoint_fails_in_the_constructor(make_publisher: MakePublisher) -> None:
    first = make_publisher("tcp://127.0.0.1:*")
    with pytest.raises(zmq.ZMQError):
        ZmqEventPublisher(PublisherConfig(endpoint=first.endpoint, replay_endpoint=None))


def test_ipc_endpoints_get_the_data_parallel_suffix(ipc_dir: str) -> None:
    config = PublisherConfig(
        endpoint=f"ipc://{ipc_dir}/pub",
        replay_endpoint=f"ipc://{ipc_dir}/replay",
        data_parallel_rank=2,
    )
    with ZmqEventPublisher(config) as publisher:
        assert publisher.endpoint == f"ipc://{ipc_dir}/pub_dp2"
        assert publisher.replay_endpoint == f"ipc://{ipc_dir}/replay_dp2"
        assert os.path.exists(f"{ipc_dir}/pub_dp2")


def test_replay_can_be_switched_off() -> None:
    config = PublisherConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint=None)
    with ZmqEventPublisher(config) as publisher:
        assert publisher.replay_endpoint is None
        publisher.publish(golden_batch())
        wait_until(lambda: publisher.stats.sent == 1, "1 batch sent")


def test_replays_beyond_the_rate_get_only_the_end_marker(
    make_publisher: MakePublisher, ctx: zmq.Context
) -> None:
    publisher = make_publisher("tcp://127.0.0.1:*", max_replays_per_s=0.2)
    payload = encode_batch(numbered_batch(0))
    publisher.publish_payload(payload)
    wait_until(lambda: publisher.stats.sent == 1, "1 batch sent")
    replies = [replay_frames(ctx, publisher.replay_endpoint, 0) for _ in range(5)]
    full = [r for r in replies if len(r) == 2]
    limited = [r for r in replies if r == [[b"", END_SEQ, b""]]]
    assert (len(full), len(limited)) == (1, 4)
    assert full[0] == [[b"", pack_seq(0), payload], [b"", END_SEQ, b""]]
    assert (publisher.stats.replay_requests, publisher.stats.replays_limited) == (5, 4)
