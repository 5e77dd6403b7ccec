"""Pushed loads on their way to the router's loop: coalesced per replica, and the
silence of a replica that pushes makes it late."""

from __future__ import annotations

import threading

from kvroute.replicas.api import ReplicaLoad
from kvroute.router.service.pushed_loads import Heard, LoadInbox


def test_the_inbox_asks_for_one_take_per_burst_and_keeps_each_replicas_latest() -> None:
    inbox = LoadInbox()
    asks = [
        inbox.put("r0", ReplicaLoad(running_seqs=1)),
        inbox.put("r1", ReplicaLoad(running_seqs=5)),
        inbox.put("r0", ReplicaLoad(running_seqs=2)),
    ]
    assert asks == [True, False, False]
    assert inbox.take() == {"r0": ReplicaLoad(running_seqs=2), "r1": ReplicaLoad(running_seqs=5)}
    assert inbox.take() == {}
    assert inbox.put("r1", ReplicaLoad()) is True


def test_the_inbox_loses_no_replica_to_puts_from_many_threads() -> None:
    inbox = LoadInbox()
    taken: dict[str, ReplicaLoad] = {}
    asks: list[bool] = []

    def push(rid: str) -> None:
        for n in range(1, 501):
            asks.append(inbox.put(rid, ReplicaLoad(running_seqs=n)))

    threads = [threading.Thread(target=push, args=(f"r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(50):
        taken.update(inbox.take())
    for thread in threads:
        thread.join(10)
    taken.update(inbox.take())
    assert taken == {f"r{i}": ReplicaLoad(running_seqs=500) for i in range(4)}
    assert 1 <= asks.count(True) <= 51  # one ask per take that found loads, plus the first


def test_a_pushing_replica_is_late_after_timeout_s_of_silence_from_push_and_poll() -> None:
    heard = Heard(timeout_s=2.0)
    heard.pushed("r0", now=10.0)
    heard.pushed("r1", now=10.0)
    heard.answered("r1", now=11.5)  # a poll answered: r1 lives
    assert heard.late(now=11.9) == []
    assert heard.late(now=12.0) == ["r0"]
    assert heard.late(now=13.5) == ["r0", "r1"]
    assert (heard.lately("r0", now=11.9), heard.lately("r0", now=12.0)) == (True, False)
    heard.pushed("r0", now=13.5)
    assert heard.late(now=13.5) == ["r1"]
    heard.forget("r1")
    assert (heard.late(now=99.0), len(heard)) == (["r0"], 1)


def test_a_replica_that_never_pushed_is_left_to_its_polls() -> None:
    heard = Heard(timeout_s=2.0)
    heard.answered("polled-only", now=1.0)
    assert len(heard) == 0
    assert heard.late(now=100.0) == []
    assert heard.lately("polled-only", now=1.0) is False
