"""Router side of the event stream: any number of publishers in, ordered batches out.

- Each source has its own SUB socket, so every message is attributable, and its
  own DEALER for replays. Batches are delivered per source in seq order and
  exactly once (ordering rules in `events.sequencer`); sources are independent.
- Sources are added and removed from any thread; changes take effect on the loop
  thread in call order. `resynced` likewise.
- Load messages (kvroute's replicas push their `ReplicaLoad` on the same socket) go
  to `on_load` as they arrive, beside the sequencer: bad ones are counted as
  malformed like bad batches.
- Callbacks run on the loop thread. A slow `on_batch` overflows this subscriber's
  high-water mark; the publisher then drops live batches for it, and the gaps are
  detected and replayed, never silent.
- Nothing that arrives can stop the loop: bad input is counted and dropped,
  callback exceptions are counted, and every read is bounded per wake.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import zmq

from kvroute.events.curve import CurveKeyPair
from kvroute.events.kv_events import DEFAULT_LIMITS, DecodeLimits, KVEventDecoder
from kvroute.events.sequencer import RecoveryConfig, SourceStats
from kvroute.events.source import (
    BatchCallback,
    Handler,
    LinkSettings,
    LoadCallback,
    ResyncCallback,
    SourceLink,
    SourceSpec,
)
from kvroute.events.waker import Waker

logger = logging.getLogger(__name__)

_MAX_COMMANDS_PER_WAKE = 1_024
# The longest the subscriber sleeps with nothing due (it recomputes what is due then).
MAX_WAIT_S = 1.0


@dataclass(frozen=True)
class SubscriberConfig:
    rcvhwm: int = 100_000  # live batches queued per source before its publisher drops them
    replay_rcvhwm: int = 100_000  # replay replies queued per source; above the replay buffer
    limits: DecodeLimits = DEFAULT_LIMITS
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    curve: CurveKeyPair | None = None  # client keys, used for sources with a CURVE server key
    tick_s: float = 0.05  # resolution of replay timeouts and idle probes
    max_reads: int = 256  # messages taken from one socket before the loop serves the others


class ZmqEventSubscriber:
    """Delivers `(source, seq, KVEventBatch)` in order per source to `on_batch`.

    `on_resync(source, reason)` is called each time a source becomes DEGRADED;
    the source then delivers nothing until `resynced(source, next_seq)`.
    `on_load(source, load)` gets each load message a source pushes.
    """

    def __init__(
        self,
        on_batch: BatchCallback,
        on_resync: ResyncCallback,
        config: SubscriberConfig | None = None,
        on_load: LoadCallback | None = None,
    ) -> None:
        self.config = config = config or SubscriberConfig()
        self.loop_errors = 0
        self._ctx = zmq.Context(io_threads=1)
        self._poller = zmq.Poller()
        self._handlers: dict[zmq.Socket | int, Handler] = {}
        self._settings = LinkSettings(
            ctx=self._ctx,
            decoder=KVEventDecoder(config.limits),
            on_batch=on_batch,
            on_resync=on_resync,
            on_load=on_load,
            recovery=config.recovery,
            rcvhwm=config.rcvhwm,
            replay_rcvhwm=config.replay_rcvhwm,
            max_reads=config.max_reads,
            curve=config.curve,
            register=self._register,
            unregister=self._unregister,
        )
        self._lock = threading.Lock()  # guards _links and _closed
        self._links: dict[str, SourceLink] = {}
        self._open: dict[SourceLink, None] = {}  # loop thread only, in open order
        self._closed = False
        self._stopping = False
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._waker = Waker()
        self._register(self._waker.fileno(), lambda now: self._waker.drain())
        self._thread = threading.Thread(target=self._run, name="kv-event-subscriber", daemon=True)

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("subscriber is stopped")
        self._thread.start()

    def add_source(self, spec: SourceSpec) -> None:
        """Connect to a publisher; a bad endpoint raises here."""
        with self._lock:
            if self._closed:
                raise RuntimeError("subscriber is stopped")
            if spec.name in self._links:
                raise ValueError(f"source {spec.name!r} already added")
            link = SourceLink(spec, self._settings)
            self._links[spec.name] = link
        self._submit(lambda: self._open_link(link))

    def remove_source(self, name: str) -> None:
        """Disconnect a source; nothing more is delivered for it once the loop applies this."""
        with self._lock:
            link = self._links.pop(name)
        self._submit(lambda: self._close_link(link))

    def resynced(self, name: str, next_seq: int | None = None) -> None:
        """The consumer rebuilt `name`'s state up to `next_seq` (exclusive); resume delivery.

        None resumes from the next batch that arrives. Safe to call from `on_resync`.
        """
        with self._lock:
            link = self._links[name]

        def apply() -> None:
            if not link.closed:
                link.sequencer.resynced(next_seq, time.monotonic())

        self._submit(apply)

    def stats(self, name: str) -> SourceStats:
        with self._lock:
            link = self._links[name]
        return link.sequencer.snapshot()

    def all_stats(self) -> dict[str, SourceStats]:
        with self._lock:
            links = list(self._links.values())
        return {link.spec.name: link.sequencer.snapshot() for link in links}

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop and close every socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.ident is None:
            self._shutdown()  # never started: the sockets are still this thread's
        else:
            self._stopping = True
            self._waker.wake()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"subscriber thread did not stop in {timeout_s} s")
        self._waker.close()
        self._ctx.term()

    def __enter__(self) -> ZmqEventSubscriber:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._waker.wake()

    def _register(self, sock: zmq.Socket | int, handler: Handler) -> None:
        self._poller.register(sock, zmq.POLLIN)
        self._handlers[sock] = handler

    def _unregister(self, sock: zmq.Socket | int) -> None:
        if self._handlers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def _open_link(self, link: SourceLink) -> None:
        if not link.closed:
            self._open[link] = None
            link.open()

    def _close_link(self, link: SourceLink) -> None:
        self._open.pop(link, None)
        link.close()

    def _run(self) -> None:
        tick_s = self.config.tick_s
        next_tick = 0.0
        wait_s = tick_s
        try:
            while not self._stopping:
                ready = self._poller.poll(math.ceil(wait_s * 1000))
                now = time.monotonic()
                for sock, _ in ready:
                    handler = self._handlers.get(sock)
                    if handler is not None:  # its socket may have closed since the poll
                        self._guarded(handler, now)
                self._run_commands()
                if now >= next_tick:
                    next_tick = now + tick_s
                    for link in list(self._open):
                        self._guarded(link.sequencer.tick, now)
                wait_s = self._wait_s(now)
        finally:
            self._shutdown()

    def _wait_s(self, now: float) -> float:
        """How long the next poll may sleep: until the first source's sequencer has
        work (`next_tick_at`), at the tick's resolution, and at most `MAX_WAIT_S`.
        Messages and commands (the waker) end it sooner. Waking every `tick_s` while
        nothing is due cost an idle router about half a point of a core."""
        due = min((link.sequencer.next_tick_at(now) for link in self._open), default=math.inf)
        return min(MAX_WAIT_S, max(self.config.tick_s, due - now))

    def _guarded(self, step: Callable[..., None], *args: float) -> None:
        """Run one step of the loop; an unexpected error is counted, never fatal."""
        try:
            step(*args)
        except Exception:
            self.loop_errors += 1
            if self.loop_errors == 1:
                logger.exception("event subscriber loop error; later ones are counted")

    def _run_commands(self, limit: int = _MAX_COMMANDS_PER_WAKE) -> None:
        for _ in range(limit):
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._guarded(command)

    def _shutdown(self) -> None:
        """Apply pending commands, then close every link, opened or not."""
        self._run_commands(limit=self._commands.qsize())
        with self._lock:
            links = [*self._open, *self._links.values()]
        for link in links:
            self._close_link(link)
