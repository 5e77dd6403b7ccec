"""Replica side of the event stream: vLLM's ZmqEventPublisher protocol with replay.

Ordering and loss rules:
- `publish` assigns seq numbers from 0 in call order and never blocks. When the
  bounded queue to the sender thread is full, the batch is dropped and counted;
  its seq is never reused, so subscribers see the gap and, the batch being in no
  buffer, ask for a resync instead of silently missing it.
- Only the sender thread touches the PUB and ROUTER sockets. A batch enters the
  replay buffer when it is sent live, so a replay never returns a batch before
  it was published, and answers every buffered seq >= the requested one in order,
  then the end marker.
- The replay socket's send high-water mark exceeds the buffer, so one full replay
  per client always fits and a replay never loses a batch in the middle.
- `publish_load` puts a replica's load beside the batches as its own message kind
  (`events.frames.load_message`): no seq, never buffered nor replayed, and coalesced:
  the sender thread sends only the latest load given since it last sent one. A load
  may overtake a batch published just before it (each wake sends both kinds).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import msgspec
import zmq

from kvroute.events.curve import CurveServerConfig, secure_server, start_authenticator
from kvroute.events.endpoints import bound_endpoint, is_loopback, offset_endpoint
from kvroute.events.errors import MalformedInputError
from kvroute.events.frames import (
    LOAD_TOPIC,
    load_message,
    pack_seq,
    parse_replay_request,
    replay_end,
    replay_reply,
)
from kvroute.events.kv_events import KVEventBatch, KVEventEncoder
from kvroute.events.load import ReplicaLoad, encode_load
from kvroute.events.waker import Waker

logger = logging.getLogger(__name__)

_POLL_MS = 100  # idle wake-up of the sender thread; publishes and replays wake it at once
_MAX_SENDS_PER_WAKE = 4_096  # sends between two looks at the replay socket
_MAX_REQUESTS_PER_WAKE = 16


@dataclass(frozen=True)
class PublisherConfig:
    """Publisher settings; defaults are vLLM's except that we bind loopback.

    `data_parallel_rank` offsets a tcp port (ipc/inproc get a `_dp{rank}` suffix);
    a `*` port binds a free one, read back from `ZmqEventPublisher.endpoint`.
    `replay_endpoint=None` disables replay (subscribers then resync on any gap).
    """

    endpoint: str = "tcp://127.0.0.1:5557"
    replay_endpoint: str | None = "tcp://127.0.0.1:5558"
    topic: str = ""
    data_parallel_rank: int = 0
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # PUB send high-water mark, per subscriber
    max_queue_size: int = 100_000  # batches waiting for the sender thread
    linger_s: float = 1.0  # how long close() may spend flushing the PUB socket
    curve: CurveServerConfig | None = None
    # Replays are the costly request (up to buffer_steps batches each): past this
    # rate a request gets only the end marker, and its router falls back to resync.
    max_replays_per_s: float = 20.0


@dataclass
class PublisherStats:
    published: int = 0  # seqs assigned
    dropped_queue_full: int = 0  # seqs whose batch found the queue full
    sent: int = 0  # batches sent live
    replay_requests: int = 0
    replayed: int = 0  # batches sent in replay replies
    bad_replay_requests: int = 0
    replays_limited: int = 0  # requests answered with the end marker only
    loads_sent: int = 0  # load messages sent
    loads_replaced: int = 0  # loads overwritten by a newer one before they were sent


class ZmqEventPublisher:
    """Publishes one replica's `KVEventBatch`es on PUB and serves replays on ROUTER.

    Sockets are bound in the constructor (so a busy port fails here); `start()`
    starts the sender thread, and batches published before it wait in the queue.
    """

    def __init__(self, config: PublisherConfig | None = None) -> None:
        self.config = config = config or PublisherConfig()
        if config.max_replays_per_s <= 0:
            raise ValueError(f"max_replays_per_s must be positive, got {config.max_replays_per_s}")
        if config.topic.encode() == LOAD_TOPIC:
            raise ValueError(f"topic {config.topic!r} is reserved for load messages")
        self._replay_tokens = max(1.0, config.max_replays_per_s)
        self._replay_time = time.monotonic()
        self.stats = PublisherStats()
        self._topic = config.topic.encode()
        self._encoder = KVEventEncoder()
        self._queue: queue.Queue[tuple[bytes, bytes]] = queue.Queue(config.max_queue_size)
        self._buffer: collections.deque[tuple[int, bytes, bytes]] = collections.deque(
            maxlen=config.buffer_steps
        )
        self._lock = threading.Lock()  # seq assignment and enqueue happen as one step
        self._next_seq = 0
        self._load: bytes | None = None  # the latest load not sent yet; under _lock
        self._closed = False
        self._stop = threading.Event()
        self._waker = Waker()
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._ctx = zmq.Context(io_threads=1)
        self._auth = start_authenticator(self._ctx, config.curve) if config.curve else None
        self._pub: zmq.Socket | None = None
        self._replay: zmq.Socket | None = None
        try:
            self._pub = pub = self._bind(zmq.PUB, config.endpoint, sndhwm=config.hwm)
            self.endpoint = bound_endpoint(pub)
            self.replay_endpoint: str | None = None
            if config.replay_endpoint is not None:
                # One full replay (buffer plus end marker) must fit in the send queue.
                self._replay = self._bind(
                    zmq.ROUTER, config.replay_endpoint, sndhwm=config.buffer_steps + 2
                )
                self.replay_endpoint = bound_endpoint(self._replay)
        except (zmq.ZMQError, ValueError):
            self._release()
            raise

    def _bind(self, kind: int, endpoint: str, *, sndhwm: int) -> zmq.Socket:
        endpoint = offset_endpoint(endpoint, self.config.data_parallel_rank)
        sock = self._ctx.socket(kind)
        try:
            sock.sndhwm = sndhwm
            if self.config.curve is not None:
                secure_server(sock, self.config.curve)
            elif not is_loopback(endpoint):
                logger.warning("event socket %s is reachable off this host without CURVE", endpoint)
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    @property
    def next_seq(self) -> int:
        """The seq the next `publish` will get."""
        return self._next_seq

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("publisher is closed")
        self._thread.start()

    def publish(self, batch: KVEventBatch) -> bool:
        """Encode and queue `batch` under the next seq; False if the queue was full.

        A batch without a `data_parallel_rank` is sent with this publisher's rank, as
        vLLM's publisher does. Encoding runs on the caller's thread (about 16 us for 64
        one-block events); nothing here waits on the network.
        """
        if batch.data_parallel_rank is None:
            batch = msgspec.structs.replace(
                batch, data_parallel_rank=self.config.data_parallel_rank
            )
        return self.publish_payload(self._encoder.encode(batch))

    def publish_payload(self, payload: bytes) -> bool:
        """Queue an already encoded batch under the next seq; False if the queue was full."""
        with self._lock:
            if self._closed:
                raise RuntimeError("publisher is closed")
            seq = self._next_seq
            self._next_seq = seq + 1
            self.stats.published += 1
            try:
                self._queue.put_nowait((pack_seq(seq), payload))
            except queue.Full:
                if self.stats.dropped_queue_full == 0:
                    logger.warning("event queue full (%d): dropping batches", self._queue.maxsize)
                self.stats.dropped_queue_full += 1
                return False
            if self._queue.qsize() == 1:  # wake only on empty -> non-empty
                self._waker.wake()
        return True

    def publish_load(self, load: ReplicaLoad) -> None:
        """Send `load` as a load message soon, replacing one given earlier and not sent
        yet: only the latest load matters. Never blocks."""
        payload = encode_load(load)
        with self._lock:
            if self._closed:
                raise RuntimeError("publisher is closed")
            replaced = self._load is not None
            self._load = payload
            if replaced:
                self.stats.loads_replaced += 1
            else:  # wake only on empty -> full; the thread takes it after draining
                self._waker.wake()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within `linger_s`), stop the thread, close the sockets.

        Idempotent; no `publish` is accepted once it has begun.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.ident is None:
            self._flush()  # never started: the sockets are still this thread's
        else:
            self._stop.set()
            self._waker.wake()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"publisher thread did not stop in {timeout_s} s")
        self._release()

    def _release(self) -> None:
        if self._pub is not None:
            self._pub.close(linger=int(self.config.linger_s * 1000))
        if self._replay is not None:
            self._replay.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self._waker.close()

    def __enter__(self) -> ZmqEventPublisher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._waker.fileno(), zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        waker_fd = self._waker.fileno()
        while not self._stop.is_set():
            ready = dict(poller.poll(0 if self._queue.qsize() else _POLL_MS))
            if waker_fd in ready:
                self._waker.drain()
            self._send_queued()
            self._send_load()
            if self._replay is not None and self._replay in ready:
                self._serve_replays()
        self._flush()

    def _flush(self) -> None:
        """Send everything queued; after close() nothing more can be queued."""
        for _ in range(self.config.max_queue_size // _MAX_SENDS_PER_WAKE + 1):
            self._send_queued()
        self._send_load()

    def _send_queued(self) -> None:
        assert self._pub is not None
        pub, topic, buffer, stats = self._pub, self._topic, self._buffer, self.stats
        for _ in range(_MAX_SENDS_PER_WAKE):
            try:
                seq_frame, payload = self._queue.get_nowait()
            except queue.Empty:
                return
            pub.send_multipart((topic, seq_frame, payload), copy=False)
            buffer.append((int.from_bytes(seq_frame, "big"), seq_frame, payload))
            stats.sent += 1

    def _send_load(self) -> None:
        assert self._pub is not None
        with self._lock:
            payload, self._load = self._load, None
        if payload is not None:
            self._pub.send_multipart(load_message(payload), copy=False)
            self.stats.loads_sent += 1

    def _replay_allowed(self) -> bool:
        """A token bucket of `max_replays_per_s`, holding one second's worth (at least one)."""
        rate = self.config.max_replays_per_s
        now = time.monotonic()
        capacity = max(1.0, rate)
        self._replay_tokens = min(capacity, self._replay_tokens + (now - self._replay_time) * rate)
        self._replay_time = now
        if self._replay_tokens < 1.0:
            return False
        self._replay_tokens -= 1.0
        return True

    def _serve_replays(self) -> None:
        assert self._replay is not None
        replay, stats = self._replay, self.stats
        for _ in range(_MAX_REQUESTS_PER_WAKE):
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                identity, start_seq = parse_replay_request(frames)
            except MalformedInputError as exc:
                if stats.bad_replay_requests == 0:
                    logger.warning("dropping bad replay requests: %s", exc)
                stats.bad_replay_requests += 1
                continue
            stats.replay_requests += 1
            if not self._replay_allowed():
                stats.replays_limited += 1
                replay.send_multipart(replay_end(identity))
                continue
            for seq, seq_frame, payload in self._buffer:
                if seq >= start_seq:
                    replay.send_multipart(replay_reply(identity, seq_frame, payload), copy=False)
                    stats.replayed += 1
            replay.send_multipart(replay_end(identity))
