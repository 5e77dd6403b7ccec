"""Loads that replica actors push, from the subscriber's thread to the router's loop,
and when each pushing replica was last heard from.

`LoadInbox` coalesces: it keeps the latest load per replica until the loop takes
them all, and `put` says when the loop must be called (the inbox was empty), so a
burst of pushes costs the loop one call, however many replicas or steps it spans.

`Heard` follows only replicas that pushed at least once: for them a push or an
answered poll is a sign of life, and silence for `timeout_s` makes them late. A
replica that never pushed is judged by its polls alone.
"""

from __future__ import annotations

import threading

from kvroute.replicas.api import ReplicaLoad


class LoadInbox:
    """Thread-safe: `put` from any thread, `take` on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads: dict[str, ReplicaLoad] = {}

    def put(self, replica_id: str, load: ReplicaLoad) -> bool:
        """Keep `load` as `replica_id`'s latest; True if the inbox was empty, so the
        caller schedules one `take`."""
        with self._lock:
            was_empty = not self._loads
            self._loads[replica_id] = load
        return was_empty

    def take(self) -> dict[str, ReplicaLoad]:
        """Every replica's latest load since the last take, and empty the inbox."""
        with self._lock:
            loads, self._loads = self._loads, {}
        return loads


class Heard:
    """When each pushing replica was last heard from, in the caller's clock (seconds)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._at)

    def pushed(self, replica_id: str, now: float) -> None:
        self._at[replica_id] = now

    def answered(self, replica_id: str, now: float) -> None:
        """A poll answered: a sign of life for a replica that pushes (others are
        judged by their polls and not followed here)."""
        if replica_id in self._at:
            self._at[replica_id] = now

    def lately(self, replica_id: str, now: float) -> bool:
        """Heard from within `timeout_s` (False for a replica that never pushed)."""
        at = self._at.get(replica_id)
        return at is not None and now - at < self.timeout_s

    def late(self, now: float) -> list[str]:
        """Pushing replicas not heard from for `timeout_s` or more."""
        return [rid for rid, at in self._at.items() if now - at >= self.timeout_s]

    def forget(self, replica_id: str) -> None:
        self._at.pop(replica_id, None)


class Working:
    """When each external engine last showed that it works: a streamed chunk or an
    event batch from it, in the caller's clock (seconds). vLLM answers `/metrics` from
    its API server process, which shares the host's cores with its engine: a late
    answer from an engine that is streaming tokens says that process is busy, not
    that the engine is gone, and routing around it would move its traffic away from
    its cache."""

    def __init__(self, within_s: float) -> None:
        self.within_s = within_s
        self._at: dict[str, float] = {}

    def saw(self, replica_id: str, now: float) -> None:
        self._at[replica_id] = now

    def lately(self, replica_id: str, now: float) -> bool:
        """Seen working within `within_s`."""
        at = self._at.get(replica_id)
        return at is not None and now - at < self.within_s

    def forget(self, replica_id: str) -> None:
        self._at.pop(replica_id, None)
