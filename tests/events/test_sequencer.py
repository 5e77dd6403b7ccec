"""The per-source ordering rules, driven directly with virtual time (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvroute.events.sequencer import (
    RecoveryConfig,
    ResyncReason,
    SourceSequencer,
    SourceState,
    SourceStats,
)

CONFIG = RecoveryConfig(replay_timeout_s=5.0, replay_attempts=3, idle_probe_s=1.0, max_held=100)


@dataclass
class FakePort:
    delivered: list[int] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    cancels: int = 0
    resyncs: list[ResyncReason] = field(default_factory=list)

    def deliver(self, seq: int, payload: bytes, replayed: bool) -> None:
        assert payload == b"p%d" % seq
        self.delivered.append(seq)
        if replayed:
            self.replayed.append(seq)

    def request_replay(self, start_seq: int) -> None:
        self.requests.append(start_seq)

    def cancel_replay(self) -> None:
        self.cancels += 1

    def resync(self, reason: ResyncReason) -> None:
        self.resyncs.append(reason)


def make(
    config: RecoveryConfig = CONFIG,
    *,
    has_replay: bool = True,
    start_seq: int | None = 0,
    catch_up: bool = False,
) -> tuple[SourceSequencer, FakePort]:
    port = FakePort()
    sequencer = SourceSequencer(
        port,
        config,
        has_replay=has_replay,
        start_seq=start_seq,
        stats=SourceStats(),
        now=0.0,
        catch_up=catch_up,
    )
    return sequencer, port


def live(sequencer: SourceSequencer, *seqs: int, now: float = 0.0) -> None:
    for seq in seqs:
        sequencer.on_live(seq, b"p%d" % seq, now)


def replay(sequencer: SourceSequencer, *seqs: int, now: float = 0.0, end: bool = True) -> None:
    for seq in seqs:
        sequencer.on_replay(seq, b"p%d" % seq, now)
    if end:
        sequencer.on_replay_end(now)


def test_in_order_live_batches_are_delivered_at_once() -> None:
    sequencer, port = make()
    live(sequencer, 0, 1, 2)
    assert port.delivered == [0, 1, 2]
    assert sequencer.snapshot().state is SourceState.EXACT
    assert sequencer.snapshot().next_seq == 3


def test_a_gap_requests_a_replay_from_the_first_missing_seq_and_holds_live_batches() -> None:
    sequencer, port = make()
    live(sequencer, 0, 3, 4)
    assert port.delivered == [0]
    assert port.requests == [1]
    assert sequencer.state is SourceState.RECOVERING
    replay(sequencer, 1, 2, 3, 4)
    assert port.delivered == [0, 1, 2, 3, 4]
    assert port.replayed == [1, 2]
    stats = sequencer.snapshot()
    assert (stats.state, stats.next_seq, stats.gaps, stats.replays) == (SourceState.EXACT, 5, 1, 1)
    assert stats.duplicates == 2  # 3 and 4 came live first


def test_live_batches_after_a_replay_continue_in_order() -> None:
    sequencer, port = make()
    live(sequencer, 0, 2)
    replay(sequencer, 1, 2)
    live(sequencer, 3, 4)
    assert port.delivered == [0, 1, 2, 3, 4]


def test_a_live_batch_that_a_replay_already_delivered_is_a_duplicate() -> None:
    sequencer, port = make()
    live(sequencer, 0, 2)
    replay(sequencer, 1, 2, 3)
    live(sequencer, 3)
    assert port.delivered == [0, 1, 2, 3]
    assert sequencer.snapshot().duplicates == 2  # replayed 2 (held live) and live 3


def test_the_first_batch_sets_the_start_when_no_start_seq_is_given() -> None:
    sequencer, port = make(start_seq=None)
    live(sequencer, 41, 42)
    assert port.delivered == [41, 42]
    assert port.requests == []


def test_a_late_first_batch_replays_from_the_start_seq() -> None:
    sequencer, port = make(start_seq=0)
    live(sequencer, 2)
    assert port.requests == [0]
    replay(sequencer, 0, 1, 2)
    assert port.delivered == [0, 1, 2]


def test_a_seq_that_goes_backwards_means_a_restart_and_asks_for_a_resync() -> None:
    sequencer, port = make()
    live(sequencer, 0, 1, 2, 0, 1)
    assert port.delivered == [0, 1, 2]
    assert port.resyncs == [ResyncReason.PUBLISHER_RESTARTED]
    assert sequencer.state is SourceState.DEGRADED
    sequencer.resynced(None, now=0.0)
    assert port.delivered == [0, 1, 2, 0, 1]
    assert sequencer.snapshot().state is SourceState.EXACT


def test_a_repeated_seq_on_the_live_stream_also_means_a_restart() -> None:
    sequencer, port = make()
    live(sequencer, 0, 0)
    assert port.resyncs == [ResyncReason.PUBLISHER_RESTARTED]


def test_a_restart_during_a_replay_cancels_it() -> None:
    sequencer, port = make()
    live(sequencer, 0, 5, 1)
    assert port.requests == [1]
    assert port.cancels == 1
    assert port.resyncs == [ResyncReason.PUBLISHER_RESTARTED]
    replay(sequencer, 1, 2)  # late replies of the cancelled replay
    assert port.delivered == [0]


def test_a_degraded_source_delivers_nothing_until_resynced() -> None:
    sequencer, port = make()
    live(sequencer, 0, 1, 0, 1, 2)
    assert port.delivered == [0, 1]
    sequencer.resynced(1, now=0.0)
    assert port.delivered == [0, 1, 1, 2]


def test_resynced_with_a_later_seq_drops_what_the_snapshot_covers() -> None:
    sequencer, port = make()
    live(sequencer, 0, 1, 0, 1, 2, 3)
    sequencer.resynced(3, now=0.0)
    assert port.delivered == [0, 1, 3]
    assert sequencer.snapshot().next_seq == 4


def test_resynced_before_the_held_batches_replays_the_difference() -> None:
    sequencer, port = make()
    live(sequencer, 0, 1, 0, 4, 5)  # restart; 0, 4, 5 held
    sequencer.resynced(3, now=0.0)
    assert port.requests == [3]
    assert sequencer.state is SourceState.RECOVERING
    replay(sequencer, 3, 4, 5)
    assert port.delivered == [0, 1, 3, 4, 5]
    assert sequencer.state is SourceState.EXACT


def test_resynced_during_a_replay_cancels_it_and_replays_the_rest_at_once() -> None:
    sequencer, port = make()
    live(sequencer, 0, 3)  # gap: a replay from 1 is in flight, 3 is held
    assert port.requests == [1]
    sequencer.resynced(2, now=0.0)  # the snapshot covers 1; 2 is still missing
    assert port.cancels == 1
    assert port.requests == [1, 2]
    assert sequencer.state is SourceState.RECOVERING
    replay(sequencer, 2, 3)
    assert port.delivered == [0, 2, 3]
    assert sequencer.state is SourceState.EXACT


def test_a_range_that_left_the_publishers_buffer_asks_for_a_resync() -> None:
    sequencer, port = make()
    live(sequencer, 0, 10)
    replay(sequencer, 7, 8, 9, 10)  # 1..6 are gone
    assert port.delivered == [0]
    assert port.resyncs == [ResyncReason.REPLAY_RANGE_LOST]
    assert sequencer.snapshot().state is SourceState.DEGRADED
    sequencer.resynced(11, now=0.0)
    live(sequencer, 11)
    assert port.delivered == [0, 11]


def test_an_empty_replay_for_a_seq_sent_before_the_request_asks_for_a_resync() -> None:
    sequencer, port = make()
    live(sequencer, 0, 2)
    replay(sequencer)
    assert port.resyncs == [ResyncReason.REPLAY_RANGE_LOST]


def test_a_seq_published_after_the_replay_answer_is_fetched_by_a_second_replay() -> None:
    sequencer, port = make()
    live(sequencer, 0, 2)
    sequencer.on_replay(1, b"p1", 0.0)
    sequencer.on_replay(2, b"p2", 0.0)
    live(sequencer, 4)  # 3 was published after the replay was answered, and lost live
    sequencer.on_replay_end(0.0)
    assert port.requests == [1, 3]
    replay(sequencer, 3, 4)
    assert port.delivered == [0, 1, 2, 3, 4]
    stats = sequencer.snapshot()
    assert (stats.state, stats.gaps, stats.replays, stats.resyncs) == (SourceState.EXACT, 1, 2, 0)


def test_a_gap_without_a_replay_endpoint_asks_for_a_resync() -> None:
    sequencer, port = make(has_replay=False)
    live(sequencer, 0, 2)
    assert port.requests == []
    assert port.resyncs == [ResyncReason.REPLAY_UNAVAILABLE]


def test_an_unanswered_replay_is_cancelled_and_retried_then_gives_up() -> None:
    sequencer, port = make()
    live(sequencer, 0, 2, now=0.0)
    sequencer.tick(4.9)
    assert port.requests == [1]
    sequencer.tick(5.0)
    sequencer.tick(10.0)
    assert port.requests == [1, 1, 1]
    assert port.cancels == 2
    sequencer.tick(15.0)
    assert port.cancels == 3
    assert port.resyncs == [ResyncReason.REPLAY_TIMEOUT]
    assert sequencer.snapshot().replays == 3


def test_replay_progress_extends_its_deadline() -> None:
    sequencer, port = make()
    live(sequencer, 0, 9, now=0.0)
    replay(sequencer, 1, 2, now=4.0, end=False)
    sequencer.tick(8.9)
    assert port.cancels == 0
    replay(sequencer, 3, 4, 5, 6, 7, 8, 9, now=8.95)
    assert port.delivered == list(range(10))


def test_an_idle_source_is_probed_and_a_lost_tail_is_recovered() -> None:
    sequencer, port = make()
    live(sequencer, 0, 1, now=0.0)
    sequencer.tick(0.9)
    assert port.requests == []
    sequencer.tick(1.0)
    assert port.requests == [2]
    replay(sequencer, 2, 3, now=1.1)
    assert port.delivered == [0, 1, 2, 3]
    stats = sequencer.snapshot()
    assert (stats.state, stats.probes, stats.gaps, stats.replays) == (SourceState.EXACT, 1, 1, 0)


def test_a_probe_that_finds_nothing_changes_nothing() -> None:
    sequencer, port = make()
    live(sequencer, 0, now=0.0)
    sequencer.tick(1.0)
    replay(sequencer, now=1.0)
    stats = sequencer.snapshot()
    assert (stats.state, stats.probes, stats.gaps, stats.resyncs) == (SourceState.EXACT, 1, 0, 0)
    sequencer.tick(1.5)
    assert port.requests == [1]  # the next probe waits a full idle period
    sequencer.tick(2.0)
    assert port.requests == [1, 1]


def test_an_unanswered_probe_is_cancelled_without_a_resync() -> None:
    sequencer, port = make()
    sequencer.tick(1.0)
    sequencer.tick(6.0)
    assert (port.requests, port.cancels, port.resyncs) == ([0], 1, [])
    assert sequencer.state is SourceState.EXACT


def test_probing_can_be_switched_off() -> None:
    sequencer, port = make(RecoveryConfig(idle_probe_s=None))
    sequencer.tick(1_000.0)
    assert port.requests == []


def test_held_batches_are_bounded_and_overflow_is_fetched_by_replay() -> None:
    sequencer, port = make(RecoveryConfig(max_held=2))
    live(sequencer, 0, 2, 3, 4, 5)
    assert sequencer.snapshot().held_overflow == 2
    replay(sequencer, 1, 2, 3, 4, 5)
    assert port.delivered == [0, 1, 2, 3, 4, 5]
    assert sequencer.state is SourceState.EXACT


def test_a_late_live_copy_of_a_replayed_batch_is_a_duplicate() -> None:
    sequencer, port = make(start_seq=0)
    live(sequencer, 1)
    replay(sequencer, 0, 1, 2, 3)
    live(sequencer, 2, 3)  # the live copies of 2 and 3 trail the replay
    assert port.delivered == [0, 1, 2, 3]
    assert port.resyncs == []
    assert sequencer.snapshot().duplicates == 3


def test_a_live_batch_whose_bytes_differ_from_the_replayed_one_means_a_restart() -> None:
    sequencer, port = make(start_seq=0)
    replay(sequencer, now=0.0)  # nothing yet
    sequencer.tick(1.0)
    replay(sequencer, 0, 1, 2, now=1.0)  # all of it found by a probe, none of it live
    sequencer.on_live(0, b"p0 of the new process", 1.1)
    assert port.resyncs == [ResyncReason.PUBLISHER_RESTARTED]
    assert sequencer.state is SourceState.DEGRADED


def test_every_repaired_gap_gets_a_fresh_replay_budget() -> None:
    # Ten gaps on one source, each repaired by its first replay: the attempt
    # budget (3) is per gap, not per source lifetime.
    sequencer, port = make()
    live(sequencer, 0)
    for gap in range(10):
        skipped, after = 1 + 3 * gap, 2 + 3 * gap
        live(sequencer, after + 1, now=float(gap))
        assert port.requests[-1] == skipped
        replay(sequencer, skipped, after, after + 1, now=float(gap))
        assert sequencer.state is SourceState.EXACT
    assert port.delivered == list(range(31))
    assert port.requests == [1 + 3 * gap for gap in range(10)]
    assert port.resyncs == []
    stats = sequencer.snapshot()
    assert (stats.gaps, stats.replays, stats.resyncs) == (10, 10, 0)


def test_a_gap_repaired_on_its_last_attempt_leaves_the_next_gap_all_its_attempts() -> None:
    # Every gap needs all three attempts (two time out): still no resync.
    sequencer, port = make()
    live(sequencer, 0)
    now = 0.0
    for gap in range(10):
        skipped = 1 + 2 * gap
        live(sequencer, skipped + 1, now=now)
        sequencer.tick(now + 5.0)
        sequencer.tick(now + 10.0)
        assert port.requests[-3:] == [skipped] * 3
        replay(sequencer, skipped, skipped + 1, now=now + 10.0)
        assert sequencer.state is SourceState.EXACT
        now += 20.0
    assert port.delivered == list(range(21))
    assert port.resyncs == []
    assert port.cancels == 20
    stats = sequencer.snapshot()
    assert (stats.gaps, stats.replays, stats.resyncs) == (10, 30, 0)


def test_catching_up_replays_from_the_oldest_batch_the_publisher_holds() -> None:
    sequencer, port = make(start_seq=None, catch_up=True)
    sequencer.tick(0.0)
    assert port.requests == [0]
    replay(sequencer, 7, 8, 9)
    assert port.delivered == [7, 8, 9]
    assert port.replayed == [7, 8, 9]
    assert sequencer.snapshot().next_seq == 10
    assert sequencer.snapshot().gaps == 0
    assert sequencer.state is SourceState.EXACT


def test_live_batches_during_a_catch_up_wait_for_it_and_overlaps_are_delivered_once() -> None:
    sequencer, port = make(start_seq=None, catch_up=True)
    sequencer.tick(0.0)
    live(sequencer, 3, 4)
    assert port.delivered == []
    replay(sequencer, 2, 3)
    assert port.delivered == [2, 3, 4]
    live(sequencer, 5)
    assert port.delivered == [2, 3, 4, 5]
    assert port.resyncs == []


def test_an_empty_catch_up_starts_from_the_first_live_batch() -> None:
    sequencer, port = make(start_seq=None, catch_up=True)
    sequencer.tick(0.0)
    live(sequencer, 0)
    replay(sequencer)
    assert port.delivered == [0]
    assert sequencer.snapshot().next_seq == 1


def test_a_live_batch_lost_after_the_catch_up_is_replayed_as_a_gap() -> None:
    sequencer, port = make(start_seq=None, catch_up=True)
    sequencer.tick(0.0)
    live(sequencer, 6)
    replay(sequencer, 3, 4)
    assert port.delivered == [3, 4]
    assert port.requests == [0, 5]
    assert sequencer.state is SourceState.RECOVERING
    replay(sequencer, 5, 6)
    assert port.delivered == [3, 4, 5, 6]


def test_an_unanswered_catch_up_is_retried_then_follows_the_live_stream() -> None:
    sequencer, port = make(start_seq=None, catch_up=True)
    now = 0.0
    for _ in range(CONFIG.replay_attempts):
        sequencer.tick(now)
        now += CONFIG.replay_timeout_s
        sequencer.tick(now)
    assert port.requests == [0, 0, 0]
    assert port.cancels == 3
    live(sequencer, 4, now=now)
    assert port.delivered == []
    sequencer.tick(now)
    assert port.delivered == [4]
    assert port.resyncs == []


def test_a_source_without_a_replay_socket_does_not_catch_up() -> None:
    sequencer, port = make(has_replay=False, start_seq=None, catch_up=True)
    sequencer.tick(0.0)
    live(sequencer, 5)
    assert port.requests == []
    assert port.delivered == [5]


def test_a_restart_during_a_catch_up_ends_it_at_the_resync() -> None:
    sequencer, port = make(start_seq=None, catch_up=True)
    sequencer.tick(0.0)
    live(sequencer, 5, 2)
    assert port.resyncs == [ResyncReason.PUBLISHER_RESTARTED]
    sequencer.resynced(None, 0.0)
    live(sequencer, 3)
    assert port.delivered == [2, 3]
    assert sequencer.state is SourceState.EXACT


def test_next_tick_at_is_when_tick_has_work_so_a_subscriber_can_sleep_until_then() -> None:
    sequencer, port = make()
    sequencer.on_live(0, b"p0", now=0.5)
    assert sequencer.next_tick_at(0.7) == 1.5  # the idle probe, idle_probe_s after activity
    sequencer.tick(1.4)
    assert port.requests == []  # nothing due before then
    sequencer.tick(1.5)
    assert port.requests == [1]  # the probe is a replay request
    assert sequencer.next_tick_at(1.6) == 1.5 + CONFIG.replay_timeout_s  # its deadline
    quiet, _ = make(RecoveryConfig(idle_probe_s=None))
    quiet.on_live(0, b"p0", now=0.0)
    assert quiet.next_tick_at(0.0) == float("inf")
