"""Exactly-once, in-order delivery of one source's batches: gap detection, replay, resync.

This is pure logic: it sees `(seq, payload)` arrivals and drives a `SequencerPort`
(deliver, request or cancel a replay, ask for a resync). The subscriber wires
sockets to it; tests drive it directly.

Ordering rules:
- Live batches come in publish order over one PUB connection, so a live seq that
  does not exceed the previous live seq means the publisher restarted. A live
  seq between the two that a replay already delivered is a late copy if its
  bytes are the replayed ones, and a restarted publisher's batch if they differ.
  (A restarted publisher that outruns the old seq before its first batch is seen
  is indistinguishable on vLLM's wire; the router learns of restarts from
  registration too.)
- A live seq beyond the next expected one is a gap. The missing range is fetched
  from the replay socket from the next expected seq; live batches that arrive
  during a replay are held and delivered after it, in seq order.
- A seq below the next expected one is a duplicate and is dropped.
- A replay returns everything the publisher still holds from the requested seq.
  A seq still missing after it, that was published before the request was
  answered (it is at or below a seq known to have been sent by then), has left
  the publisher's buffer: replay is impossible and the source is DEGRADED.
  A seq published after the answer is fetched by another replay.
- A DEGRADED source delivers nothing until `resynced`; the router rebuilds that
  source's state from a snapshot and names the first seq the snapshot lacks.
- An idle source is probed with a replay from its next seq, so loss at the tail
  of a burst is found without waiting for the next batch.
- A source that catches up (`catch_up`, with a replay socket and no `start_seq`)
  asks for a replay from seq 0 on its first tick: the first seq the publisher
  still holds becomes the next expected one, so what it published before the
  subscriber joined is delivered first. Live batches are held until that replay
  ends; one that never answers is given up after `replay_attempts`, and delivery
  starts from the live stream.

Everything is bounded: held batches (`max_held`), replay attempts, and the time
a replay may go without progress.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from kvroute.events.errors import MalformedKind


class SourceState(enum.Enum):
    EXACT = "exact"  # every batch since the start (or the last resync) delivered once, in order
    RECOVERING = "recovering"  # a gap was seen; a replay is in flight and later batches are held
    DEGRADED = "degraded"  # loss that replay cannot repair; waiting for `resynced`


class ResyncReason(enum.Enum):
    PUBLISHER_RESTARTED = "publisher_restarted"  # a live seq went backwards
    REPLAY_RANGE_LOST = "replay_range_lost"  # the missing seqs left the publisher's buffer
    REPLAY_UNAVAILABLE = "replay_unavailable"  # the source has no replay endpoint
    REPLAY_TIMEOUT = "replay_timeout"  # the replay socket did not answer in any attempt


@dataclass(frozen=True)
class RecoveryConfig:
    replay_timeout_s: float = 5.0  # longest a replay may go without a reply
    replay_attempts: int = 3  # replay requests per gap before giving up
    idle_probe_s: float | None = 1.0  # probe a source silent this long; None: never
    max_held: int = 10_000  # batches held during a replay or a resync


@dataclass
class SourceStats:
    """Counters of one source; `state` and `next_seq` are filled in by snapshots."""

    state: SourceState = SourceState.EXACT
    next_seq: int | None = None
    batches: int = 0  # delivered
    events: int = 0  # delivered, summed over batches
    replayed: int = 0  # delivered batches that came from a replay
    gaps: int = 0  # losses detected (by a seq jump or an idle probe)
    replays: int = 0  # replay requests sent to repair a gap
    probes: int = 0  # replay requests sent to an idle source
    resyncs: int = 0  # resync requests (entries into DEGRADED)
    duplicates: int = 0  # batches dropped because their seq was already delivered
    held_overflow: int = 0  # batches not held because `max_held` was reached
    malformed: int = 0  # frames or payloads dropped as bad input
    malformed_by_kind: dict[MalformedKind, int] = field(
        default_factory=lambda: dict.fromkeys(MalformedKind, 0)
    )
    callback_errors: int = 0  # exceptions raised by the delivery or resync callback
    loads: int = 0  # load messages delivered (kvroute's replicas push their load)
    last_seen: float | None = None  # wall time of the last message, live or replayed
    last_batch_ts: float | None = None  # `ts` of the last delivered batch


class SequencerPort(Protocol):
    def deliver(self, seq: int, payload: bytes, replayed: bool) -> None: ...

    def request_replay(self, start_seq: int) -> None: ...

    def cancel_replay(self) -> None:
        """Forget the outstanding replay: none of its replies may arrive afterwards."""

    def resync(self, reason: ResyncReason) -> None: ...


class SourceSequencer:
    """Turns one source's live and replayed arrivals into exactly-once, in-order delivery."""

    def __init__(
        self,
        port: SequencerPort,
        config: RecoveryConfig,
        *,
        has_replay: bool,
        start_seq: int | None,
        stats: SourceStats,
        now: float,
        catch_up: bool = False,
    ) -> None:
        self._port = port
        self._config = config
        self._has_replay = has_replay
        self._stats = stats
        self.state = SourceState.EXACT
        self._next = start_seq  # None: the first batch to arrive sets it
        self._last_live: int | None = None
        # seq -> hash of the payload, for replayed batches the live stream has not
        # caught up with yet, oldest first (at most max_held).
        self._replayed: OrderedDict[int, int] = OrderedDict()
        self._held: dict[int, tuple[bytes, bool]] = {}  # seq -> (payload, came by replay)
        self._last_activity = now
        self._replay_active = False
        self._replay_attempts = 0
        self._replay_deadline = 0.0
        self._replay_known_sent = -1  # newest seq known to be published when the request left
        # Waiting for the replay of everything the publisher holds (see the ordering rules).
        self._catching_up = catch_up and has_replay and start_seq is None

    def snapshot(self) -> SourceStats:
        stats = self._stats
        return dataclasses.replace(
            stats,
            state=self.state,
            next_seq=self._next,
            malformed_by_kind=dict(stats.malformed_by_kind),
        )

    def on_live(self, seq: int, payload: bytes, now: float) -> None:
        self._last_activity = now
        last, self._last_live = self._last_live, seq
        if last is not None and seq <= last:
            self._restart(seq, payload)
            return
        if self.state is SourceState.DEGRADED or self._catching_up:
            self._hold(seq, payload, replayed=False)
            return
        if self._next is None:
            self._next = seq
        if seq < self._next:
            self._late_live_copy(seq, payload)
        elif seq == self._next:
            self._deliver(seq, payload, replayed=False)
        else:
            self._hold(seq, payload, replayed=False)
            self._found_gap(now)

    def on_replay(self, seq: int, payload: bytes, now: float) -> None:
        if not self._replay_active:
            return
        self._replay_deadline = now + self._config.replay_timeout_s
        self._replay_known_sent = max(self._replay_known_sent, seq)
        if self._catching_up and self._next is None:
            self._next = seq  # the oldest batch the publisher still holds
        if self._next is None or seq < self._next:
            self._stats.duplicates += 1
            return
        if not self._catching_up:
            self._found_gap(now)  # a probe that returns an unseen seq has found a loss
        if seq == self._next:
            self._deliver(seq, payload, replayed=True)
        else:
            self._hold(seq, payload, replayed=True)

    def on_replay_end(self, now: float) -> None:
        if not self._replay_active:
            return
        self._replay_active = False
        self._last_activity = now
        if self._catching_up:
            self._caught_up(now)
            return
        if self.state is not SourceState.RECOVERING:
            return
        if not self._held:
            self._recovered()
        elif self._next is not None and self._next <= self._replay_known_sent:
            self._degrade(ResyncReason.REPLAY_RANGE_LOST)
        else:
            self._start_replay(now)

    def tick(self, now: float) -> None:
        """Catch up, enforce the replay timeout and probe an idle source; call it
        periodically."""
        if self._replay_active:
            if now >= self._replay_deadline:
                self._port.cancel_replay()
                self._replay_active = False
                self._last_activity = now
                if self.state is SourceState.RECOVERING:
                    self._start_replay(now)
            return
        if self._catching_up:
            if self._replay_attempts >= self._config.replay_attempts:
                self._caught_up(now)  # the replay socket never answered: follow the live stream
            else:
                self._replay_attempts += 1
                self._stats.replays += 1
                self._request(0, now)
            return
        if now >= self._probe_at():
            self._stats.probes += 1
            self._send_replay(now)

    def next_tick_at(self, now: float) -> float:
        """When `tick` next has work: the replay's deadline, at once while catching
        up, or the idle probe's time; inf if never. Mirrors `tick`'s conditions, so a
        caller may sleep until then (or until a message for this source) instead of
        ticking on a fixed period."""
        if self._replay_active:
            return self._replay_deadline
        if self._catching_up:
            return now
        return self._probe_at()

    def _probe_at(self) -> float:
        """When an idle source is probed (a replay of what follows its last batch,
        which finds a lost tail): `idle_probe_s` after its last activity, while it is
        exact and has a replay socket; inf otherwise."""
        probe_s = self._config.idle_probe_s
        if (
            probe_s is None
            or self.state is not SourceState.EXACT
            or not self._has_replay
            or self._next is None
        ):
            return math.inf
        return self._last_activity + probe_s

    def resynced(self, next_seq: int | None, now: float) -> None:
        """The consumer rebuilt this source's state up to `next_seq` (exclusive).

        None means "from whatever comes next": the lowest held seq, else the next
        live batch.
        """
        if self._replay_active:
            self._port.cancel_replay()
            self._replay_active = False
        self._catching_up = False  # the consumer's state now stands in for the replay
        self._replayed.clear()
        held = self._held
        if next_seq is None:
            next_seq = min(held) if held else None
        if next_seq is not None:
            for seq in [s for s in held if s < next_seq]:
                del held[seq]
        self._next = next_seq
        self._recovered()
        self._drain_held()
        if held:
            self._found_gap(now)

    def _found_gap(self, now: float) -> None:
        """Enter RECOVERING (once per gap) and make sure a replay is on its way."""
        if self.state is not SourceState.EXACT:
            return
        self._stats.gaps += 1
        self.state = SourceState.RECOVERING
        if not self._replay_active:
            self._start_replay(now)

    def _start_replay(self, now: float) -> None:
        if not self._has_replay:
            self._degrade(ResyncReason.REPLAY_UNAVAILABLE)
        elif self._replay_attempts >= self._config.replay_attempts:
            self._degrade(ResyncReason.REPLAY_TIMEOUT)
        else:
            self._replay_attempts += 1
            self._stats.replays += 1
            self._send_replay(now)

    def _send_replay(self, now: float) -> None:
        assert self._next is not None
        self._request(self._next, now)

    def _request(self, start_seq: int, now: float) -> None:
        self._replay_active = True
        self._replay_deadline = now + self._config.replay_timeout_s
        self._replay_known_sent = -1 if self._last_live is None else self._last_live
        self._port.request_replay(start_seq)

    def _caught_up(self, now: float) -> None:
        """End the catch-up: deliver what the live stream brought meanwhile, from the
        replay's end (or, if nothing was replayed, from the first live batch held)."""
        self._catching_up = False
        self._replay_attempts = 0
        held = self._held
        if self._next is None:
            self._next = min(held) if held else None
        self._drain_held()
        if held:
            self._found_gap(now)

    def _late_live_copy(self, seq: int, payload: bytes) -> None:
        """A live seq below the next expected one: a duplicate, or a restarted publisher."""
        replayed = self._replayed
        digest = replayed.get(seq)
        while replayed and next(iter(replayed)) <= seq:  # the live stream is past these
            replayed.popitem(last=False)
        if digest is not None and digest != hash(payload):
            self._restart(seq, payload)
        else:
            self._stats.duplicates += 1

    def _deliver(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        self._held.pop(seq, None)
        self._deliver_next(seq, payload, replayed)
        self._drain_held()

    def _deliver_next(self, seq: int, payload: bytes, replayed: bool) -> None:
        self._next = seq + 1
        if replayed:
            if len(self._replayed) >= self._config.max_held:
                self._replayed.popitem(last=False)
            self._replayed[seq] = hash(payload)
        elif self._replayed:
            self._replayed.clear()  # delivered live: the live stream is past every replayed seq
        self._port.deliver(seq, payload, replayed)

    def _drain_held(self) -> None:
        held = self._held
        seq = self._next
        while seq in held:
            self._deliver_next(seq, *held.pop(seq))
            seq = self._next

    def _hold(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        if seq in self._held:
            self._stats.duplicates += 1
        elif len(self._held) >= self._config.max_held:
            self._stats.held_overflow += 1  # a later replay fetches it again
        else:
            self._held[seq] = (payload, replayed)

    def _recovered(self) -> None:
        self.state = SourceState.EXACT
        self._replay_attempts = 0

    def _restart(self, seq: int, payload: bytes) -> None:
        self._replayed.clear()
        self._held.clear()
        self._held[seq] = (payload, False)
        self._degrade(ResyncReason.PUBLISHER_RESTARTED)

    def _degrade(self, reason: ResyncReason) -> None:
        if self._replay_active:
            self._port.cancel_replay()
            self._replay_active = False
        self.state = SourceState.DEGRADED
        self._stats.resyncs += 1
        self._port.resync(reason)
