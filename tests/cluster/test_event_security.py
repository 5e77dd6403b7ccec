"""The event plane is encrypted by default: only the cluster's routers can read it."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import zmq

from kvroute.events.curve import CurveKeyPair, secure_client
from kvroute.events.frames import pack_seq
from tests.cluster.conftest import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(120)]


def _traffic(deployment: Deployment, stop: threading.Event) -> None:
    """Requests until `stop`, so every replica keeps publishing events."""
    client = deployment.client()
    n = 0
    while not stop.is_set():
        client.generate([1000 + n % 500, 7, 8, 9] * 20, max_tokens=1)
        n += 1


def _frames_received(endpoint: str, keys: CurveKeyPair | None, server_key: str) -> int:
    """Multipart messages a SUB on `endpoint` receives in 3 s (a CURVE client with
    `keys`, or a plain one)."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        if keys is not None:
            secure_client(sub, keys, server_key)
        sub.subscribe(b"")
        sub.connect(endpoint)
        received = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if sub.poll(100):
                sub.recv_multipart()
                received += 1
        return received
    finally:
        sub.close(linger=0)
        ctx.term()


def test_only_the_routers_key_reads_a_replicas_events(deployment: Deployment) -> None:
    info = ray.get(deployment.replicas[0].info.remote())
    assert info.curve_public_key is not None
    stop = threading.Event()
    load = threading.Thread(target=_traffic, args=(deployment, stop), daemon=True)
    load.start()
    try:
        router_view = _frames_received(info.event_endpoint, deployment.keys, info.curve_public_key)
        plain = _frames_received(info.event_endpoint, None, info.curve_public_key)
        stranger = _frames_received(
            info.event_endpoint, CurveKeyPair.generate(), info.curve_public_key
        )
    finally:
        stop.set()
        load.join(timeout=30)
    assert router_view > 0, "positive control: the router's key receives the live stream"
    assert (plain, stranger) == (0, 0)


def test_a_stranger_gets_no_replay(deployment: Deployment) -> None:
    info = ray.get(deployment.replicas[0].info.remote())
    assert info.replay_endpoint is not None

    def replay_reply(keys: CurveKeyPair | None) -> bool:
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        try:
            if keys is not None:
                secure_client(dealer, keys, info.curve_public_key or "")
            dealer.connect(info.replay_endpoint)
            dealer.send_multipart([b"", pack_seq(0)], flags=zmq.NOBLOCK)
            return bool(dealer.poll(2000))
        except zmq.Again:
            return False
        finally:
            dealer.close(linger=0)
            ctx.term()

    assert replay_reply(deployment.keys), "positive control: the router's key gets a replay"
    assert not replay_reply(None)
    assert not replay_reply(CurveKeyPair.generate())
