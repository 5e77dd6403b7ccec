"""CurveZMQ: with keys configured, a subscriber without the right keys receives nothing.

Each "receives nothing" test has a positive control beside it: the same
subscriber setup receives once CURVE is off or its key is allowed, so the
silence is CURVE's doing.
"""

from __future__ import annotations

import pytest

from kvroute.events.curve import CurveKeyPair, CurveServerConfig
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.events.sequencer import RecoveryConfig
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import SubscriberConfig, ZmqEventSubscriber
from tests.events.helpers import Collector, numbered_batch

pytestmark = pytest.mark.timeout(60)

# No idle probes, so that nothing but the live stream is compared.
NO_PROBES = RecoveryConfig(idle_probe_s=None)


def curve_publisher(curve: CurveServerConfig | None) -> ZmqEventPublisher:
    """A publisher on loopback tcp; `curve=None` for the positive controls."""
    config = PublisherConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", curve=curve)
    publisher = ZmqEventPublisher(config)
    publisher.start()
    return publisher


def subscriber_with(
    keys: CurveKeyPair | None, publisher: ZmqEventPublisher, server_key: str | None
) -> tuple[ZmqEventSubscriber, Collector]:
    collector = Collector()
    subscriber = ZmqEventSubscriber(
        collector.on_batch, collector.on_resync, SubscriberConfig(curve=keys, recovery=NO_PROBES)
    )
    subscriber.add_source(
        SourceSpec(
            "r0",
            publisher.endpoint,
            publisher.replay_endpoint,
            start_seq=None,
            curve_server_key=server_key,
        )
    )
    subscriber.start()
    return subscriber, collector


def publish_until_delivered(publisher: ZmqEventPublisher, collector: Collector, count: int) -> None:
    """Publish until `collector`'s subscriber has `count` batches (bounded)."""
    for n in range(10_000):
        publisher.publish(numbered_batch(n))
        if collector.satisfied_within(lambda: len(collector.seqs("r0")) >= count, 0.01):
            return
    raise AssertionError(f"the subscriber got {len(collector.seqs('r0'))} batches")


def test_a_subscriber_without_curve_keys_receives_nothing() -> None:
    server = CurveServerConfig(CurveKeyPair.generate())
    publisher = curve_publisher(server)
    trusted, trusted_got = subscriber_with(
        CurveKeyPair.generate(), publisher, server.keys.public_key
    )
    plain, plain_got = subscriber_with(None, publisher, None)
    try:
        publish_until_delivered(publisher, trusted_got, 20)
        assert plain_got.delivered == {}
        assert plain.stats("r0").last_seen is None
        assert trusted.stats("r0").batches >= 20
    finally:
        plain.stop()
        trusted.stop()
        publisher.close()


def test_control_the_same_keyless_subscriber_receives_from_a_publisher_without_curve() -> None:
    # Positive control for the test above: its keyless subscriber is not
    # deaf for another reason.
    publisher = curve_publisher(None)
    plain, plain_got = subscriber_with(None, publisher, None)
    try:
        publish_until_delivered(publisher, plain_got, 20)
        assert plain.stats("r0").batches >= 20
        assert plain.stats("r0").last_seen is not None
    finally:
        plain.stop()
        publisher.close()


def test_a_client_key_outside_the_allow_list_receives_nothing() -> None:
    allowed, stranger = CurveKeyPair.generate(), CurveKeyPair.generate()
    server = CurveServerConfig(CurveKeyPair.generate(), frozenset([allowed.public_key]))
    publisher = curve_publisher(server)
    member, member_got = subscriber_with(allowed, publisher, server.keys.public_key)
    outsider, outsider_got = subscriber_with(stranger, publisher, server.keys.public_key)
    try:
        publish_until_delivered(publisher, member_got, 20)
        assert outsider_got.delivered == {}
        assert outsider.stats("r0").last_seen is None
    finally:
        outsider.stop()
        member.stop()
        publisher.close()


def test_control_the_same_client_key_receives_once_it_is_on_the_allow_list() -> None:
    # Positive control for the test above: the same keys and setup, with the
    # stranger's public key added to the allow list.
    allowed, stranger = CurveKeyPair.generate(), CurveKeyPair.generate()
    server = CurveServerConfig(
        CurveKeyPair.generate(), frozenset([allowed.public_key, stranger.public_key])
    )
    publisher = curve_publisher(server)
    member, member_got = subscriber_with(allowed, publisher, server.keys.public_key)
    outsider, outsider_got = subscriber_with(stranger, publisher, server.keys.public_key)
    try:
        publish_until_delivered(publisher, member_got, 20)
        publish_until_delivered(publisher, outsider_got, 20)
        assert outsider.stats("r0").batches >= 20
    finally:
        outsider.stop()
        member.stop()
        publisher.close()


def test_a_source_that_needs_curve_is_refused_without_client_keys() -> None:
    collector = Collector()
    subscriber = ZmqEventSubscriber(collector.on_batch, collector.on_resync)
    key = CurveKeyPair.generate().public_key
    with pytest.raises(ValueError, match="needs CURVE"):
        subscriber.add_source(SourceSpec("r0", "tcp://127.0.0.1:9", curve_server_key=key))
    subscriber.stop()
