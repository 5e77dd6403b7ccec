"""One publisher as the subscriber sees it: its SUB and DEALER sockets and its sequencer.

A `SourceLink` is created on any thread but, once handed to the subscriber's
loop, is used only by that thread. It reads frames, counts and drops bad input
(logging each kind once per source), and serves as the sequencer's port: it
decodes delivered payloads and calls the consumer's callbacks, which may raise
without harming the loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from kvroute.events.curve import CurveKeyPair, secure_client
from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.frames import (
    LOAD_TOPIC,
    is_load,
    parse_live,
    parse_load,
    parse_replay_reply,
    replay_request,
)
from kvroute.events.kv_events import EventDecoder, KVEventBatch
from kvroute.events.load import ReplicaLoad, decode_load
from kvroute.events.sequencer import (
    RecoveryConfig,
    ResyncReason,
    SourceSequencer,
    SourceStats,
)

logger = logging.getLogger(__name__)

BatchCallback = Callable[[str, int, KVEventBatch], None]
ResyncCallback = Callable[[str, ResyncReason], None]
LoadCallback = Callable[[str, ReplicaLoad], None]
Handler = Callable[[float], None]


@dataclass(frozen=True)
class SourceSpec:
    """One publisher to subscribe to.

    `replay_endpoint=None` means gaps cannot be repaired and lead to a resync.
    `start_seq` is the first seq expected (0: a replica registers before it
    publishes); None accepts whatever arrives first. `catch_up` (with a replay
    endpoint and no `start_seq`) first replays everything the publisher still
    holds, so a subscriber that joins late sees what was published before it.
    `curve_server_key` is the publisher's CURVE public key when it requires CURVE.
    `decoder` reads this publisher's payloads; None: the subscriber's (vLLM's wire
    format). `loads`: also subscribe to the publisher's load messages (kvroute's own
    replicas push them; under the empty topic they arrive anyway).
    """

    name: str
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    start_seq: int | None = 0
    catch_up: bool = False
    curve_server_key: str | None = None
    decoder: EventDecoder | None = None
    loads: bool = False


@dataclass(frozen=True)
class LinkSettings:
    """What every link of one subscriber shares."""

    ctx: zmq.Context
    decoder: EventDecoder
    on_batch: BatchCallback
    on_resync: ResyncCallback
    on_load: LoadCallback | None  # None: load messages are counted and dropped
    recovery: RecoveryConfig
    rcvhwm: int
    replay_rcvhwm: int
    max_reads: int  # messages read from one socket before the loop looks at the others
    curve: CurveKeyPair | None
    register: Callable[[zmq.Socket, Handler], None]
    unregister: Callable[[zmq.Socket], None]


class SourceLink:
    def __init__(self, spec: SourceSpec, settings: LinkSettings) -> None:
        if spec.curve_server_key is not None and settings.curve is None:
            raise ValueError(f"source {spec.name!r} needs CURVE but the subscriber has no keys")
        self.spec = spec
        self._settings = settings
        self._decoder = spec.decoder or settings.decoder
        self.stats = SourceStats()
        self._logged: set[MalformedKind] = set()
        self._sub = self._socket(zmq.SUB, settings.rcvhwm)
        self._dealer: zmq.Socket | None = None
        self.closed = False
        try:
            self._sub.setsockopt(zmq.SUBSCRIBE, spec.topic.encode())
            if spec.loads and not LOAD_TOPIC.startswith(spec.topic.encode()):
                self._sub.setsockopt(zmq.SUBSCRIBE, LOAD_TOPIC)
            self._sub.connect(spec.endpoint)
            self._dealer = self._new_dealer()
        except (zmq.ZMQError, ValueError):
            self.close()
            raise
        self.sequencer = SourceSequencer(
            self,
            settings.recovery,
            has_replay=spec.replay_endpoint is not None,
            start_seq=spec.start_seq,
            stats=self.stats,
            now=time.monotonic(),
            catch_up=spec.catch_up,
        )

    def _socket(self, kind: int, rcvhwm: int) -> zmq.Socket:
        sock = self._settings.ctx.socket(kind)
        try:
            sock.rcvhwm = rcvhwm
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, self._decoder.limits.max_payload_bytes)
            if self.spec.curve_server_key is not None:
                assert self._settings.curve is not None
                secure_client(sock, self._settings.curve, self.spec.curve_server_key)
        except zmq.ZMQError:
            sock.close()
            raise
        return sock

    def _new_dealer(self) -> zmq.Socket | None:
        if self.spec.replay_endpoint is None:
            return None
        dealer = self._socket(zmq.DEALER, self._settings.replay_rcvhwm)
        try:
            dealer.connect(self.spec.replay_endpoint)
        except zmq.ZMQError:
            dealer.close()
            raise
        return dealer

    def open(self) -> None:
        """Start polling this link's sockets (on the loop thread)."""
        self._settings.register(self._sub, self._read_live)
        if self._dealer is not None:
            self._settings.register(self._dealer, self._read_replay)

    def close(self) -> None:
        """Stop polling and close the sockets (on the loop thread). Idempotent."""
        self.closed = True
        for sock in (self._sub, self._dealer):
            if sock is not None and not sock.closed:
                self._settings.unregister(sock)
                sock.close()

    def _read_live(self, now: float) -> None:
        sub, sequencer = self._sub, self.sequencer
        for _ in range(self._settings.max_reads):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if is_load(frames):
                self._read_load(frames)
                continue
            try:
                seq, payload = parse_live(frames)
            except MalformedInputError as exc:
                self._malformed(exc)
                continue
            self.stats.last_seen = time.time()
            sequencer.on_live(seq, payload, now)

    def _read_load(self, frames: list[bytes]) -> None:
        """Decode a load message and hand it on; it bypasses the sequencer (no seq:
        only the latest load matters)."""
        try:
            load = decode_load(parse_load(frames))
        except MalformedInputError as exc:
            self._malformed(exc)
            return
        self.stats.last_seen = time.time()
        self.stats.loads += 1
        if self._settings.on_load is None:
            return
        try:
            self._settings.on_load(self.spec.name, load)
        except Exception:
            self._callback_failed("on_load")

    def _read_replay(self, now: float) -> None:
        dealer, sequencer = self._dealer, self.sequencer
        assert dealer is not None
        for _ in range(self._settings.max_reads):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                seq, payload = parse_replay_reply(frames)
            except MalformedInputError as exc:
                self._malformed(exc)
                continue
            self.stats.last_seen = time.time()
            if seq is None:
                sequencer.on_replay_end(now)
            else:
                sequencer.on_replay(seq, payload, now)
            if self._dealer is not dealer:
                return  # the sequencer cancelled this replay and replaced the socket

    def _malformed(self, error: MalformedInputError) -> None:
        stats = self.stats
        stats.malformed += 1
        stats.malformed_by_kind[error.kind] += 1
        if error.kind not in self._logged:
            self._logged.add(error.kind)
            logger.warning(
                "source %s: dropped bad input (%s); more of this kind is counted, not logged",
                self.spec.name,
                error,
            )

    # SequencerPort

    def deliver(self, seq: int, payload: bytes, replayed: bool) -> None:
        try:
            batch = self._decoder.decode(payload)
        except MalformedInputError as exc:
            self._malformed(exc)
            return
        stats = self.stats
        stats.batches += 1
        stats.events += len(batch.events)
        stats.replayed += replayed
        stats.last_batch_ts = batch.ts
        try:
            self._settings.on_batch(self.spec.name, seq, batch)
        except Exception:
            self._callback_failed("on_batch")

    def request_replay(self, start_seq: int) -> None:
        assert self._dealer is not None
        with contextlib.suppress(zmq.Again):  # a full queue: the replay times out, is retried
            self._dealer.send_multipart(replay_request(start_seq), zmq.NOBLOCK)

    def cancel_replay(self) -> None:
        old = self._dealer
        if old is None:
            return
        self._settings.unregister(old)
        old.close()
        self._dealer = self._new_dealer()
        assert self._dealer is not None
        self._settings.register(self._dealer, self._read_replay)

    def resync(self, reason: ResyncReason) -> None:
        logger.warning("source %s needs a resync: %s", self.spec.name, reason.value)
        try:
            self._settings.on_resync(self.spec.name, reason)
        except Exception:
            self._callback_failed("on_resync")

    def _callback_failed(self, name: str) -> None:
        self.stats.callback_errors += 1
        if self.stats.callback_errors == 1:
            logger.exception("source %s: %s raised; later errors are counted", self.spec.name, name)
