"""Ingest of a scanned batch (`events/scan.py`): its op arrays applied to one
group's tables in one compiled call, with no Python step per event.

The kernel applies the group's events key by key, in stream order, with the same
per-key steps as `EventIngest`'s runs (settle the key's prediction, then store or
discard it): a run's table call goes through its keys in order, and the tables of
confirmed and predicted entries are apart, so the per-key order gives the same
index, counters and returned keys as the per-run one.

Python splits the batch at each AllBlocksCleared (which touches every group), and
the kernel stops, leaving the rest of its group to Python, at a removal after a
store found its key already held (the second copy is counted in a Python dict,
which that removal must read).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kvroute.events.scan import (
    CLEARED,
    OP_BLOCK_SIZE,
    OP_GROUP,
    OP_KEYS_END,
    OP_KEYS_START,
    OP_KIND,
    OP_SPEC_END,
    OP_SPEC_START,
    STORED,
)
from kvroute.router.index.block_table import discard_key, store_key, warm

# Slots of the kernel's tallies array.
STORED_BLOCKS, REMOVED_BLOCKS, REMOVED_UNKNOWN, CONFIRMED, HELD, SETTLED, WARMED = range(7)
TALLIES = 7


@njit(cache=True)
def resolve_groups(
    ops: np.ndarray,
    buf: np.ndarray,
    block_sizes: np.ndarray,
    kinds: np.ndarray,
    kind_lengths: np.ndarray,
    per_group: np.ndarray,
) -> np.ndarray:
    """Each event's group as the registration knows it (an untagged event is group
    0 of a single-group replica; -1 for AllBlocksCleared), or an empty array if any
    event is one that ingest refuses: an unknown group, or a BlockStored whose
    spec kind or block size differs from its group's. per_group[g] becomes
    (events, stored keys) of group g; per_group[-1, 0] the AllBlocksCleared count."""
    groups = np.empty(ops.shape[0], np.int64)
    count = block_sizes.size
    per_group[:] = 0
    for i in range(ops.shape[0]):
        if ops[i, OP_KIND] == CLEARED:
            groups[i] = -1
            per_group[count, 0] += 1
            continue
        group = ops[i, OP_GROUP]
        if group < 0:
            if count != 1:
                return groups[:0]
            group = 0
        if group >= count:
            return groups[:0]
        if ops[i, OP_KIND] == STORED:
            if ops[i, OP_BLOCK_SIZE] != block_sizes[group]:
                return groups[:0]
            start = ops[i, OP_SPEC_START]
            if start >= 0:
                length = ops[i, OP_SPEC_END] - start
                if length != kind_lengths[group]:
                    return groups[:0]
                for k in range(length):
                    if buf[start + k] != kinds[group, k]:
                        return groups[:0]
            per_group[group, 1] += ops[i, OP_KEYS_END] - ops[i, OP_KEYS_START]
        per_group[group, 0] += 1
        groups[i] = group
    return groups


@njit(cache=True)
def apply_group(
    ops: np.ndarray,
    keys: np.ndarray,
    groups: np.ndarray,
    start: int,
    stop: int,
    first_key: int,
    group: int,
    bit: int,
    slots: np.ndarray,
    table_keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    owners: np.ndarray,
    counts: np.ndarray,
    shift: np.uint64,
    p_slots: np.ndarray,
    p_keys: np.ndarray,
    p_holders: np.ndarray,
    p_masks: np.ndarray,
    p_owners: np.ndarray,
    p_counts: np.ndarray,
    p_shift: np.uint64,
    held: np.ndarray,
    tallies: np.ndarray,
) -> tuple[int, int]:
    """Apply the events of `group` in ops[start:stop] (no AllBlocksCleared among
    them), from key `first_key` of the first if not -1, in order, to the group's
    confirmed table (and settle its predicted one). Returns (stop, -1) when done;
    (i, j) when key j of event i needs a spill row and the pool is full (grow it,
    resume there); (i, -1) at a removal after a held key (see the module doc).
    Entries for the stores must be reserved (`BlockTable.reserve_stores`). Keys
    stored while held are appended to `held`, counted in tallies[HELD]."""
    word = bit >> 6
    removable = word < masks.shape[1]
    predictable = word < p_masks.shape[1]
    if start < stop:  # every key of the span (another group's too: it only costs time)
        span = keys[ops[start, OP_KEYS_START] : ops[stop - 1, OP_KEYS_END]]
        tallies[WARMED] = np.int64(warm(slots, table_keys, holders, shift, span) & np.uint64(1))
    for i in range(start, stop):
        kind = ops[i, OP_KIND]
        if groups[i] != group:
            continue
        first, end = ops[i, OP_KEYS_START], ops[i, OP_KEYS_END]
        if i == start and first_key >= 0:
            first = first_key
        if kind == STORED:
            for j in range(first, end):
                key = keys[j]
                if (
                    predictable
                    and p_counts[0] > 0
                    and discard_key(
                        p_slots, p_keys, p_holders, p_masks, p_owners, p_counts, p_shift, key, bit
                    )
                ):
                    tallies[CONFIRMED] += 1
                    tallies[SETTLED] += 1
                done = store_key(slots, table_keys, holders, masks, owners, counts, shift, key, bit)
                if done == 1:
                    held[tallies[HELD]] = key
                    tallies[HELD] += 1
                elif done == 2:
                    return i, j
            tallies[STORED_BLOCKS] += end - ops[i, OP_KEYS_START]
        else:
            if tallies[HELD]:
                return i, -1
            for j in range(first, end):
                key = keys[j]
                if predictable and p_counts[0] > 0:
                    tallies[SETTLED] += discard_key(
                        p_slots, p_keys, p_holders, p_masks, p_owners, p_counts, p_shift, key, bit
                    )
                if not (
                    removable
                    and discard_key(
                        slots, table_keys, holders, masks, owners, counts, shift, key, bit
                    )
                ):
                    tallies[REMOVED_UNKNOWN] += 1
            tallies[REMOVED_BLOCKS] += end - first
    return stop, -1
