"""Test doubles for the event stream: a delivery collector and a scripted publisher."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvroute.events.frames import pack_seq, parse_replay_request, replay_end
from kvroute.events.kv_events import BlockStored, KVEventBatch, encode_batch
from kvroute.events.load import ReplicaLoad
from kvroute.events.publisher import ZmqEventPublisher
from kvroute.events.sequencer import RecoveryConfig, ResyncReason, SourceState, SourceStats
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import ZmqEventSubscriber

Transport = str  # an endpoint template with a `{name}` slot (ignored by tcp)

WAIT_S = 20.0  # upper bound of every wait; a healthy run takes a fraction of it

# Tests find tail losses and dead replays quickly; the defaults are for production.
FAST_RECOVERY = RecoveryConfig(replay_timeout_s=2.0, replay_attempts=3, idle_probe_s=0.2)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `predicate` until true; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def wait_exact(subscriber: ZmqEventSubscriber, name: str) -> SourceStats:
    """Wait until `name` is EXACT (a replay ends after its last batch is delivered)."""
    wait_until(lambda: subscriber.stats(name).state is SourceState.EXACT, f"{name} EXACT")
    return subscriber.stats(name)


def numbered_batch(n: int, events: int = 1) -> KVEventBatch:
    """A batch whose content identifies `n`: its first block hash is `n`."""
    return KVEventBatch(
        ts=float(n),
        events=[
            BlockStored(
                block_hashes=[n + i],
                parent_block_hash=None,
                token_ids=list(range(16)),
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
            for i in range(events)
        ],
        data_parallel_rank=0,
    )


def batch_number(batch: KVEventBatch) -> int:
    first = batch.events[0]
    assert isinstance(first, BlockStored)
    hash_ = first.block_hashes[0]
    assert isinstance(hash_, int)
    return hash_


@dataclass
class Collector:
    """Records deliveries and resync requests from the subscriber thread."""

    delivered: dict[str, list[tuple[int, KVEventBatch]]] = field(default_factory=dict)
    resyncs: list[tuple[str, ResyncReason]] = field(default_factory=list)
    loads: list[tuple[str, ReplicaLoad]] = field(default_factory=list)
    gate: threading.Event | None = None  # when set up, on_batch blocks until it is set
    blocked: threading.Event = field(default_factory=threading.Event)  # on_batch hit the gate
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def on_batch(self, source: str, seq: int, batch: KVEventBatch) -> None:
        if self.gate is not None:
            self.blocked.set()
            self.gate.wait(WAIT_S)
        with self._cond:
            self.delivered.setdefault(source, []).append((seq, batch))
            self._cond.notify_all()

    def on_resync(self, source: str, reason: ResyncReason) -> None:
        with self._cond:
            self.resyncs.append((source, reason))
            self._cond.notify_all()

    def on_load(self, source: str, load: ReplicaLoad) -> None:
        with self._cond:
            self.loads.append((source, load))
            self._cond.notify_all()

    def loads_of(self, source: str) -> list[ReplicaLoad]:
        with self._cond:
            return [load for name, load in self.loads if name == source]

    def seqs(self, source: str) -> list[int]:
        with self._cond:
            return [seq for seq, _ in self.delivered.get(source, [])]

    def satisfied_within(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        if not self.satisfied_within(predicate, WAIT_S):
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")

    def wait_seqs(self, source: str, count: int) -> list[int]:
        self.wait_for(
            lambda: len(self.delivered.get(source, [])) >= count,
            f"{count} batches from {source} (have {len(self.delivered.get(source, []))})",
        )
        return self.seqs(source)

    def wait_resyncs(self, count: int) -> list[tuple[str, ResyncReason]]:
        self.wait_for(lambda: len(self.resyncs) >= count, f"{count} resync requests")
        with self._cond:
            return list(self.resyncs)


class ScriptedPublisher:
    """A protocol-level publisher whose live stream the test controls.

    Every `publish` enters the replay buffer (at most `buffer_steps`), but only
    the ones with `live=True` go out on PUB. An XPUB socket lets the test wait
    until a subscriber is subscribed, so no batch is lost to a slow joiner unless
    the test means it. Replies may carry the topic frame, as newer vLLM sends.
    """

    def __init__(
        self, transport: str, *, buffer_steps: int = 10_000, reply_with_topic: bool = False
    ) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.bind(transport.format(name="pub"))
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        router = self.ctx.socket(zmq.ROUTER)
        router.bind(transport.format(name="replay"))
        self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = router
        self._reply_with_topic = reply_with_topic
        self._buffer: list[tuple[int, bytes]] = []
        self._buffer_steps = buffer_steps
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.replay_requests: list[int] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def wait_subscribed(self) -> None:
        if not self.pub.poll(int(WAIT_S * 1000)):
            raise AssertionError("no subscriber subscribed to the scripted publisher")
        self.pub.recv()

    def publish(self, seq: int, payload: bytes, *, live: bool = True) -> None:
        with self._lock:
            self._buffer.append((seq, payload))
            del self._buffer[: -self._buffer_steps]
        if live:
            self.send_raw([b"", pack_seq(seq), payload])

    def publish_batch(self, seq: int, *, live: bool = True) -> None:
        self.publish(seq, encode_batch(numbered_batch(seq)), live=live)

    def send_raw(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            identity, start = parse_replay_request(self._router.recv_multipart())
            self.replay_requests.append(start)
            with self._lock:
                replies = [(seq, payload) for seq, payload in self._buffer if seq >= start]
            topic = [b""] if self._reply_with_topic else []
            for seq, payload in replies:
                self._router.send_multipart([identity, b"", *topic, pack_seq(seq), payload])
            end = replay_end(identity)
            self._router.send_multipart(end[:2] + topic + end[2:])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self._router.close(linger=0)
        self.pub.close(linger=0)
        self.ctx.term()


def spec_for(
    name: str, publisher: ZmqEventPublisher | ScriptedPublisher, **options: Any
) -> SourceSpec:
    """The source spec that subscribes to `publisher` under `name`."""
    return SourceSpec(name, publisher.endpoint, publisher.replay_endpoint, **options)
