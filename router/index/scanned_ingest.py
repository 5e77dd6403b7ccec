"""Ingest of a scanned batch (`events/scan.py`): its op arrays applied to one
group's tables in one compiled call, with no Python step per event.

The kernel applies the group's events key by key, in stream order, with the same
per-key steps as `EventIngest`'s runs (settle the key's prediction, then store or
discard it): a run's table call goes through its keys in order, and the tables of
confirmed and predicted entries are apart, so the per-key order gives the same
index, counters and returned keys as the per-run one.

Before applying anything, the first call of a batch checks every event as
`EventIngest` would (a known group; a BlockStored of its group's block size and
spec kind) and refuses the batch if one fails, which the event-by-event path then
counts. The kernel stops and says why (`Status`) where Python must act: at an
AllBlocksCleared (which touches every group), when the table needs room, and at a
removal after a store found its key already held (the second copy is counted in a
Python dict, which that removal must read).
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
from kvroute.router.index.block_table import (
    discard_key,
    has_room,
    shrinkable,
    store_key,
    warm,
)

# What `apply_group` returns.
DONE, AT_CLEAR, NEED_SPILL, NEED_ROOM, AT_SECOND_COPY, REFUSED = range(6)
# Slots of its tallies array: counters summed over a batch's calls, then where it
# stopped (event, key), the stores to make room for, whether a table can shrink
# (1: confirmed, 2: predicted).
STORED_BLOCKS, REMOVED_BLOCKS, REMOVED_UNKNOWN, CONFIRMED, HELD = range(5)
NEXT, NEXT_KEY, NEED, SHRINK = range(5, 9)
TALLIES = 9
# Columns of a replica's layout row: block size, spec kind length, then its bytes.
LAYOUT_BLOCK_SIZE, LAYOUT_KIND_LENGTH, LAYOUT_KIND = range(3)
# `groups` entry of an AllBlocksCleared.
_NO_GROUP = -2


@njit(cache=True)
def _resolve(ops: np.ndarray, buf: np.ndarray, layout: np.ndarray, groups: np.ndarray) -> bool:
    """Each event's group as the registration knows it, into `groups` (an untagged
    event is group 0 of a single-group replica); False if any event is one that
    ingest refuses: an unknown group, or a BlockStored whose spec kind or block
    size differs from its group's."""
    count = layout.shape[0]
    for i in range(ops.shape[0]):
        if ops[i, OP_KIND] == CLEARED:
            groups[i] = _NO_GROUP
            continue
        group = ops[i, OP_GROUP]
        if group < 0:
            if count != 1:
                return False
            group = 0
        if group >= count:
            return False
        if ops[i, OP_KIND] == STORED:
            if ops[i, OP_BLOCK_SIZE] != layout[group, LAYOUT_BLOCK_SIZE]:
                return False
            start = ops[i, OP_SPEC_START]
            if start >= 0:
                length = ops[i, OP_SPEC_END] - start
                if length != layout[group, LAYOUT_KIND_LENGTH]:
                    return False
                for k in range(length):
                    if buf[start + k] != layout[group, LAYOUT_KIND + k]:
                        return False
        groups[i] = group
    return True


@njit(cache=True, inline="always")
def _settle(
    predictable: bool,
    p_slots: np.ndarray,
    p_keys: np.ndarray,
    p_holders: np.ndarray,
    p_masks: np.ndarray,
    p_owners: np.ndarray,
    p_counts: np.ndarray,
    p_shift: np.uint64,
    key: np.uint64,
    bit: int,
) -> bool:
    """Drop `bit`'s prediction of `key` from the predicted table, if it has one:
    whether it had (a stored block confirms it, a removed one ends it)."""
    return (
        predictable
        and p_counts[0] > 0
        and discard_key(p_slots, p_keys, p_holders, p_masks, p_owners, p_counts, p_shift, key, bit)
    )


@njit(cache=True)
def apply_group(
    ops: np.ndarray,
    keys: np.ndarray,
    buf: np.ndarray,
    layout: np.ndarray,
    groups: np.ndarray,
    validate: bool,
    start: int,
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
) -> int:
    """Apply the events of `group` (-1: none, only find the next AllBlocksCleared)
    from event `start` (from its key `first_key`, if not -1) to the next
    AllBlocksCleared or the end, in order, to the group's confirmed table, settling
    its predicted one. With `validate`, `groups` is filled first (REFUSED: nothing
    applied). Returns a status; tallies[NEXT] (and [NEXT_KEY]) say where it stopped.
    Keys stored while held are appended to `held`, counted in tallies[HELD]."""
    if validate and not _resolve(ops, buf, layout, groups):
        return REFUSED
    end = ops.shape[0]
    stores = 0
    for i in range(start, ops.shape[0]):
        if ops[i, OP_KIND] == CLEARED:
            end = i
            break
        if groups[i] == group and ops[i, OP_KIND] == STORED:
            stores += ops[i, OP_KEYS_END] - ops[i, OP_KEYS_START]
    tallies[NEXT], tallies[NEXT_KEY] = end, -1
    if group < 0 or start == end:
        return AT_CLEAR if end < ops.shape[0] else DONE
    if stores and not (
        has_room(slots, table_keys, masks, counts, stores, bit)
        and held.size >= tallies[HELD] + stores
    ):
        tallies[NEXT], tallies[NEED] = start, stores
        return NEED_ROOM
    # Every key of the span (another group's too: it only costs time).
    span = keys[ops[start, OP_KEYS_START] : ops[end - 1, OP_KEYS_END]]
    warm(slots, table_keys, holders, counts[0], shift, span, span.size)
    removable = bit >> 6 < masks.shape[1]
    predictable = bit >> 6 < p_masks.shape[1]
    status = AT_CLEAR if end < ops.shape[0] else DONE
    for i in range(start, end):
        if groups[i] != group:
            continue
        first, last = ops[i, OP_KEYS_START], ops[i, OP_KEYS_END]
        if i == start and first_key >= 0:
            first = first_key
        if ops[i, OP_KIND] == STORED:
            for j in range(first, last):
                key = keys[j]
                if _settle(
                    predictable,
                    p_slots,
                    p_keys,
                    p_holders,
                    p_masks,
                    p_owners,
                    p_counts,
                    p_shift,
                    key,
                    bit,
                ):
                    tallies[CONFIRMED] += 1
                    tallies[SHRINK] |= 2
                done = store_key(slots, table_keys, holders, masks, owners, counts, shift, key, bit)
                if done == 1:
                    held[tallies[HELD]] = key
                    tallies[HELD] += 1
                elif done == 2:
                    tallies[NEXT], tallies[NEXT_KEY] = i, j
                    return NEED_SPILL
            tallies[STORED_BLOCKS] += last - ops[i, OP_KEYS_START]
        else:
            if tallies[HELD]:
                tallies[NEXT] = i
                status = AT_SECOND_COPY
                break
            for j in range(first, last):
                key = keys[j]
                if _settle(
                    predictable,
                    p_slots,
                    p_keys,
                    p_holders,
                    p_masks,
                    p_owners,
                    p_counts,
                    p_shift,
                    key,
                    bit,
                ):
                    tallies[SHRINK] |= 2
                if not (
                    removable
                    and discard_key(
                        slots, table_keys, holders, masks, owners, counts, shift, key, bit
                    )
                ):
                    tallies[REMOVED_UNKNOWN] += 1
            tallies[REMOVED_BLOCKS] += last - first
    if shrinkable(slots, table_keys, masks, counts):
        tallies[SHRINK] |= 1
    return status
