"""The router's memory of recently seen prompt blocks (eviction hints)."""

from __future__ import annotations

import pytest

from kvroute.router.reuse import ReuseTracker


def test_a_first_prompt_has_no_reuse_and_its_repeat_is_fully_reused() -> None:
    tracker = ReuseTracker(capacity_blocks=100, block_size=16)
    assert tracker.observe([b"a", b"b", b"c"]) == 0
    assert tracker.observe([b"a", b"b", b"c"]) == 48


def test_only_the_leading_run_of_seen_blocks_counts() -> None:
    tracker = ReuseTracker(capacity_blocks=100, block_size=16)
    tracker.observe([b"a", b"b", b"c"])
    assert tracker.observe([b"a", b"x", b"c"]) == 16
    assert tracker.observe([b"y", b"a"]) == 0


def test_a_block_is_remembered_for_between_half_and_all_of_the_capacity() -> None:
    tracker = ReuseTracker(capacity_blocks=4, block_size=1)
    tracker.observe([b"a", b"b"])  # generation full (capacity / 2): it becomes the previous one
    tracker.observe([b"c"])
    assert len(tracker) == 3
    assert tracker.observe([b"a"]) == 1  # re-recorded; the generation {c, a} rotates, b is gone
    assert len(tracker) == 2
    assert tracker.observe([b"b"]) == 0
    assert tracker.observe([b"c"]) == 1


def test_capacity_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        ReuseTracker(capacity_blocks=1, block_size=16)
