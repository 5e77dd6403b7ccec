"""Predicted index entries: blocks a replica will cache for a request just routed.

A burst of similar prompts reaches the router before the first BlockStored does;
predicting the chosen replica's blocks keeps the burst together.

Invariants:
- Predictions live in their own table per group, apart from confirmed entries,
  so expiry never touches what events confirmed.
- A prediction ends when its TTL passes, when a BlockStored or BlockRemoved of
  the same block arrives, or when its request fails; a later prediction of the
  same block moves its deadline.
- Expiry keeps one heap entry per predicted request and group, not per block:
  a long prompt predicts hundreds of blocks.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import numpy as np

from kvroute.router.index.block_table import BlockTable
from kvroute.router.index.stats import IndexStats

GroupKeys = Iterable[tuple[int, np.ndarray]]


# How long a prediction counts as cached before its events confirm it (seconds).
DEFAULT_PREDICTION_TTL_S = 2.0


class Predictions:
    def __init__(
        self,
        confirmed: list[BlockTable],
        stats: IndexStats,
        ttl_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.confirmed = confirmed
        self.stats = stats
        self.ttl_s = ttl_s
        self.clock = clock
        self.tables: list[BlockTable] = []
        self._expiry: list[tuple[float, int, int, int, list[int]]] = []
        self._expiry_order = 0
        # (bit, group) -> event key -> the deadline of its latest prediction
        self._deadline: dict[tuple[int, int], dict[int, float]] = {}

    def __len__(self) -> int:
        self.expire()
        return sum(len(t) for t in self.tables)

    def grow(self, num_groups: int) -> None:
        while len(self.tables) < num_groups:
            self.tables.append(BlockTable())

    def add(self, bit: int, group_keys: GroupKeys) -> int:
        """Predict `bit` holds each group's keys that it does not hold yet; the number
        of (hash, group) entries added."""
        expires = self.clock() + self.ttl_s
        added = 0
        for group, keys in group_keys:
            fresh = keys[~self.confirmed[group].holding(keys, bit)]
            if not fresh.size:
                continue
            new_keys = fresh.tolist()
            self.tables[group].store(fresh, bit)
            deadlines = self._deadline.setdefault((bit, group), {})
            deadlines.update(dict.fromkeys(new_keys, expires))  # faster than a zip
            self._expiry_order += 1
            heapq.heappush(self._expiry, (expires, self._expiry_order, bit, group, new_keys))
            added += len(new_keys)
        self.stats.predictions_added += added
        return added

    def drop(self, bit: int, group_keys: GroupKeys) -> None:
        """Retire a failed request's predictions at once."""
        for group, keys in group_keys:
            self.tables[group].discard(keys, bit)

    def settle(self, group: int, keys: np.ndarray, bit: int) -> int:
        """An event about these blocks arrived: their predictions are over. Returns
        how many predictions it ended."""
        table = self.tables[group]
        return table.discard(keys, bit) if len(table) else 0

    def clear_bit(self, bit: int) -> None:
        for table in self.tables:
            table.clear_bit(bit)

    def expire(self) -> None:
        now = self.clock()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            expires, _, bit, group, keys = heapq.heappop(expiry)
            deadline = self._deadline.get((bit, group), {})
            # Keys refreshed by a later prediction, or expired already, are not due.
            due = [key for key in keys if deadline.get(key) == expires]
            for key in due:
                deadline.pop(key, None)
            if due:
                expired = self.tables[group].discard(np.array(due, np.uint64), bit)
                self.stats.predictions_expired += expired
