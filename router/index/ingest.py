"""Event ingest: KV event batches applied to the index's confirmed block tables.

Each group's consecutive events of one kind become one table call (groups are
independent, so interleaved groups still batch); a malformed event is dropped
alone and counted. Removals, one event per evicted block and nearly every event
of a stream, are gathered a span at a time (the events between two others) with
C-level maps, not a Python step per event.

Invariants:
- A bit is set iff the replica caches that (hash, group) at least once; the
  rare second copy of a hash on one replica is counted in `_extra_copies`, so
  a BlockRemoved of one copy does not clear the bit.
- An event of a group the registration does not know, or whose kind or block
  size disagrees with it, is counted and dropped without touching the index.
- A BlockStored or BlockRemoved settles any prediction of the same block.

A batch the decoder scanned (`ScannedEvents`) is applied from its op arrays, one
compiled call per group (`scanned_ingest.py`), to the same effect; one holding an
event that ingest refuses goes the way of any other batch, event by event.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, compress, count, repeat
from operator import attrgetter, is_not
from typing import Any

import numpy as np

from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvroute.events.scan import OP_KEYS_END, OP_KEYS_START, OP_KIND, STORED, ScannedEvents
from kvroute.router.index.block_table import BlockTable
from kvroute.router.index.predictions import Predictions
from kvroute.router.index.registry import ReplicaEntry
from kvroute.router.index.scanned_ingest import (
    AT_SECOND_COPY,
    HELD,
    LAYOUT_KIND,
    NEED,
    NEED_ROOM,
    NEED_SPILL,
    NEXT,
    NEXT_KEY,
    REFUSED,
    SHRINK,
    TALLIES,
    apply_group,
)
from kvroute.router.index.stats import IndexStats

UINT64_MAX = (1 << 64) - 1
_INT_ONLY = frozenset({int})
_GROUP_OF = attrgetter("group_idx")
_HASHES_OF = attrgetter("block_hashes")


def event_hash(block_hash: bytes) -> int:
    """The event form of an engine hash: its last 8 bytes, big-endian."""
    return int.from_bytes(block_hash[-8:], "big")


def event_keys(block_hashes: Sequence[bytes]) -> np.ndarray:
    """`event_hash` of every hash, as uint64. The index's hashes all come from
    one hash function, whose digests share a width, so one strided view of the
    joined bytes reads every key."""
    count = len(block_hashes)
    if not count:
        return np.empty(0, np.uint64)
    width = len(block_hashes[0])
    joined = b"".join(block_hashes)
    if width >= 8 and len(joined) == width * count:
        return np.ndarray((count,), ">u8", joined, width - 8, (width,)).astype(np.uint64)
    return np.array([event_hash(h) for h in block_hashes], np.uint64)


class _EventRun:
    """Consecutive events of one kind and group: each event's block hashes."""

    __slots__ = ("hashes", "kind")

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.hashes: list[Sequence[Any]] = []


class EventIngest:
    def __init__(
        self, confirmed: list[BlockTable], predictions: Predictions, stats: IndexStats
    ) -> None:
        self.confirmed = confirmed
        self.predictions = predictions
        self.stats = stats
        # (bit, group) -> key -> copies beyond the first
        self._extra_copies: dict[tuple[int, int], dict[int, int]] = {}
        # replica bit -> (its entry, its groups as `apply_group` reads them); then the
        # kernel's scratch arrays, reused by every batch.
        self._layouts: dict[int, tuple[ReplicaEntry, np.ndarray]] = {}
        self._groups = np.empty(64, np.int64)
        self._held = np.empty(0, np.uint64)
        self._tallies = np.zeros(TALLIES, np.int64)

    def apply(self, entry: ReplicaEntry, batch: KVEventBatch) -> None:
        """Apply one registered replica's batch, in order."""
        self.stats.batches += 1
        events = batch.events
        if type(events) is ScannedEvents and self._apply_scanned(entry, events):
            return
        # Runs of different groups touch different tables, so they commute.
        runs: dict[int, _EventRun] = {}
        end = len(events)
        others = compress(count(), map(is_not, map(type, events), repeat(BlockRemoved)))
        start = 0
        for stop in chain(others, (end,)):
            if start < stop:
                self._removals(entry, events[start:stop], runs)
            if stop < end:
                self._other(entry, events[stop], runs)
            start = stop + 1
        self._flush_all(entry.bit, runs)

    def _apply_scanned(self, entry: ReplicaEntry, scanned: ScannedEvents) -> bool:
        """Apply a scanned batch from its op arrays; False (nothing applied) if it
        holds an event ingest refuses, which the event-by-event path counts."""
        layout = self._layouts.get(entry.bit)
        if layout is None or layout[0] is not entry:
            layout = self._layouts[entry.bit] = (entry, _group_layout(entry))
        rows = layout[1]
        count = len(scanned.ops)
        if self._groups.size < count:
            self._groups = np.empty(max(count, 2 * self._groups.size), np.int64)
        tallies = self._tallies
        tallies[:] = 0
        bit, start, validate = entry.bit, 0, True
        while True:
            for group in range(len(rows)):
                if self._apply_group(bit, group, scanned, rows, start, validate) == REFUSED:
                    return False
                validate = False
            stop = int(tallies[NEXT])
            if stop == count:
                break
            self.stats.cleared += 1
            self.clear(bit)
            start = stop + 1
        stored, removed, unknown, confirmed = tallies[:HELD].tolist()
        stats = self.stats
        stats.stored_blocks += stored
        stats.removed_blocks += removed
        stats.removed_unknown += unknown
        stats.predictions_confirmed += confirmed
        return True

    def _apply_group(
        self,
        bit: int,
        group: int,
        scanned: ScannedEvents,
        layout: np.ndarray,
        start: int,
        validate: bool,
    ) -> int:
        """Events of `group` from `start` to the next AllBlocksCleared: by the kernel
        while no second copy of a key is in play, by the per-run steps from there
        on. Returns the kernel's last status; tallies[NEXT] is where they end."""
        confirmed, predicted = self.confirmed[group], self.predictions.tables[group]
        tallies, ops, keys, groups = self._tallies, scanned.ops, scanned.keys, self._groups
        kernel_group, first_key = group, -1

        def kernel(validate: bool, start: int, first_key: int, kernel_group: int) -> int:
            """`apply_group` over this batch and this group's tables."""
            return int(
                apply_group(
                    ops,
                    keys,
                    scanned.buffer,
                    layout,
                    groups,
                    validate,
                    start,
                    first_key,
                    kernel_group,
                    bit,
                    *confirmed.parts(),
                    *predicted.parts(),
                    self._held,
                    tallies,
                )
            )

        if (bit, group) in self._extra_copies:
            kernel_group = -1  # only check the batch and find where the span ends
        while True:
            status = kernel(validate, start, first_key, kernel_group)
            validate = False
            if status == NEED_ROOM:
                need = int(tallies[NEED])
                confirmed.reserve_stores(need, bit)
                if self._held.size < tallies[HELD] + need:
                    grown = np.empty(int(tallies[HELD]) + 2 * need, np.uint64)
                    grown[: tallies[HELD]] = self._held[: tallies[HELD]]
                    self._held = grown
            elif status == NEED_SPILL:
                confirmed.grow_spill()
                start, first_key = int(tallies[NEXT]), int(tallies[NEXT_KEY])
            else:
                break
        if status == REFUSED:
            return status
        shrink = int(tallies[SHRINK])
        if shrink:
            if shrink & 1:
                confirmed.settle()
            if shrink & 2:
                predicted.settle()
            tallies[SHRINK] = 0
        if tallies[HELD]:
            self._count_copies(bit, group, self._held[: tallies[HELD]])
            tallies[HELD] = 0
        if status == AT_SECOND_COPY or kernel_group < 0:
            # The rest of the group's span, each event a run of its own.
            start = int(tallies[NEXT]) if status == AT_SECOND_COPY else start
            status = kernel(False, start, -1, -1)
            for i in range(start, int(tallies[NEXT])):
                if groups[i] == group:
                    event_keys = keys[ops[i, OP_KEYS_START] : ops[i, OP_KEYS_END]].copy()
                    if ops[i, OP_KIND] == STORED:
                        self._store(bit, group, event_keys)
                    else:
                        self._remove(bit, group, event_keys)
        return status

    def _removals(
        self, entry: ReplicaEntry, span: list[BlockRemoved], runs: dict[int, _EventRun]
    ) -> None:
        """Consecutive BlockRemoved events: all of one known group (the usual case)
        join that group's run at once; anything else goes event by event."""
        groups = len(entry.group_kinds)
        tags = list(map(_GROUP_OF, span))
        group = tags[0]
        if tags.count(group) == len(tags):
            if group is None and groups == 1:
                group = 0
            if group is not None and 0 <= group < groups:
                self._run(entry.bit, group, BlockRemoved, runs).hashes.extend(map(_HASHES_OF, span))
                return
        for event in span:
            self._other(entry, event, runs)

    def _other(self, entry: ReplicaEntry, event: Any, runs: dict[int, _EventRun]) -> None:
        """One event of any kind, applied in its order among the batch's events."""
        kind = type(event)
        if kind is BlockStored or kind is BlockRemoved:
            group = self._group_of(entry, event)
            if group is not None:
                self._run(entry.bit, group, kind, runs).hashes.append(event.block_hashes)
        elif kind is AllBlocksCleared:
            self._flush_all(entry.bit, runs)
            self.stats.cleared += 1
            self.clear(entry.bit)

    def _run(self, bit: int, group: int, kind: type, runs: dict[int, _EventRun]) -> _EventRun:
        """The group's open run of `kind`, after flushing its run of the other kind."""
        run = runs.get(group)
        if run is None or run.kind is not kind:
            if run is not None:
                self._flush(bit, group, run)
            run = runs[group] = _EventRun(kind)
        return run

    def clear(self, bit: int) -> None:
        """Forget every confirmed block of `bit`: a compiled sweep, O(index size),
        acceptable for clears, deaths and resyncs."""
        for table in self.confirmed:
            table.clear_bit(bit)
        for dup in [k for k in self._extra_copies if k[0] == bit]:
            del self._extra_copies[dup]

    def _flush_all(self, bit: int, runs: dict[int, _EventRun]) -> None:
        for group, run in runs.items():
            self._flush(bit, group, run)
        runs.clear()

    def _flush(self, bit: int, group: int, run: _EventRun) -> None:
        """One table call for the run. Its hashes are checked all at once: ints in
        uint64 go straight to an array; otherwise each event is checked alone, and
        one holding a malformed hash is dropped and counted."""
        hashes = run.hashes
        keys = hashes[0] if len(hashes) == 1 else list(chain.from_iterable(hashes))
        batch = None
        if _INT_ONLY.issuperset(map(type, keys)):
            try:
                batch = np.array(keys, np.uint64)
            except OverflowError:
                batch = None
        if batch is None:
            batch = np.array(self._checked(hashes), np.uint64)
        if run.kind is BlockStored:
            self._store(bit, group, batch)
        else:
            self._remove(bit, group, batch)

    def _checked(self, hashes: list[Sequence[Any]]) -> list[int]:
        """The run's keys without the events holding a malformed hash."""
        keys: list[int] = []
        for event_hashes in hashes:
            event_keys = self._keys(event_hashes)
            if event_keys is not None:
                keys.extend(event_keys)
        return keys

    def _group_of(self, entry: ReplicaEntry, event: BlockStored | BlockRemoved) -> int | None:
        group = event.group_idx
        log_once = self.stats.log_once
        if group is None:
            if len(entry.group_kinds) != 1:
                self.stats.unknown_group += 1
                log_once(
                    "no_group", "dropping an untagged event of hybrid replica %r", entry.replica_id
                )
                return None
            group = 0
        if not 0 <= group < len(entry.group_kinds):
            self.stats.unknown_group += 1
            log_once(
                "unknown_group",
                "dropping events of group %s unknown to replica %r",
                group,
                entry.replica_id,
            )
            return None
        if type(event) is BlockStored and (
            (
                event.kv_cache_spec_kind is not None
                and event.kv_cache_spec_kind != entry.group_kinds[group]
            )
            or event.block_size != entry.group_block_sizes[group]
        ):
            self.stats.mismatched_group += 1
            log_once(
                "mismatched_group",
                "dropping BlockStored for group %s of %r: kind %r / block size %s do not match "
                "the registration (%r / %s)",
                group,
                entry.replica_id,
                event.kv_cache_spec_kind,
                event.block_size,
                entry.group_kinds[group],
                entry.group_block_sizes[group],
            )
            return None
        return group

    def _keys(self, block_hashes: Sequence[int | bytes]) -> list[int] | None:
        """The event's keys, or None (counted) if any hash is malformed."""
        keys = []
        for h in block_hashes:
            if type(h) is int and 0 <= h <= UINT64_MAX:
                keys.append(h)
            elif isinstance(h, bytes) and h:
                keys.append(event_hash(h))
            else:
                self.stats.bad_hash += 1
                self.stats.log_once(
                    "bad_hash", "dropping an event with a malformed block hash %r", h
                )
                return None
        return keys

    def _store(self, bit: int, group: int, batch: np.ndarray) -> None:
        self.stats.predictions_confirmed += self.predictions.settle(group, batch, bit)
        held = self.confirmed[group].store(batch, bit)
        if held.size:
            self._count_copies(bit, group, held)
        self.stats.stored_blocks += batch.size

    def _count_copies(self, bit: int, group: int, held: np.ndarray) -> None:
        """Stored keys the replica held already: one more copy each."""
        extra = self._extra_copies.setdefault((bit, group), {})
        for key in held.tolist():
            extra[key] = extra.get(key, 0) + 1

    def _remove(self, bit: int, group: int, batch: np.ndarray) -> None:
        removed = batch.size
        self.predictions.settle(group, batch, bit)
        extra = self._extra_copies.get((bit, group))
        if extra:
            # A removed second copy leaves the bit set. Copies only go down
            # within a run, so deciding them before the table call is exact.
            single = []
            for key in batch.tolist():
                copies = extra.get(key)
                if copies is None:
                    single.append(key)
                elif copies == 1:
                    del extra[key]
                else:
                    extra[key] = copies - 1
            if not extra:
                del self._extra_copies[(bit, group)]
            batch = np.array(single, np.uint64)
        cleared = self.confirmed[group].discard(batch, bit)
        self.stats.removed_unknown += batch.size - cleared
        self.stats.removed_blocks += removed


def _group_layout(entry: ReplicaEntry) -> np.ndarray:
    """An entry's groups as `apply_group` reads them: per group a row of its block
    size, its spec kind's length and the kind's bytes (zero-padded)."""
    encoded = [kind.encode() for kind in entry.group_kinds]
    rows = np.zeros((len(encoded), LAYOUT_KIND + max(map(len, encoded))), np.int64)
    for row, (kind, block_size) in enumerate(zip(encoded, entry.group_block_sizes, strict=True)):
        rows[row, :LAYOUT_KIND] = block_size, len(kind)
        rows[row, LAYOUT_KIND : LAYOUT_KIND + len(kind)] = np.frombuffer(kind, np.uint8)
    return rows
