"""A compact hash table from 64-bit block keys to the replicas holding them.

Why not a `dict[int, int]`: each entry costs a Python int key object plus the
dict's own slot, about 78 B at 1M entries. Why not a bitmask per entry: at
1,024 replicas it is 128 B even for a block one replica holds, and most blocks
are held by one or a few. Here an entry costs its key (8 B), INLINE 2-byte
replica ids (8 B) and 6-16 B of slot array (up to ~32 B after many deletes:
slots shrink only below 1/8 load): about 28 B at any replica count. A block
held by more than INLINE replicas spills to a row of a bitmask pool (8 B per
64 replica bits), which it keeps until its last holder goes.

Layout, after CPython's compact dict:
- `slots`: int32[capacity], a power of two. A slot is EMPTY, DELETED (a
  tombstone, which keeps probe chains intact) or the index of an entry. A key's
  home slot is the top bits of key * 2^64/phi (Fibonacci hashing), so keys
  sharing low bits (small ints in tests, structured hashes) still spread;
  collisions probe linearly.
- `keys`: uint64[n] and `holders`: uint16[n, INLINE] are dense: entries
  0..size-1 are live. Deleting an entry moves the last one into its place and
  re-points that entry's slot (and its spill row's owner), so there are no holes.
- An entry's holder ids fill its row from the front, then NOBODY; or its row is
  SPILLED followed by the spill row's index (low 16 bits, high 16 bits). Spill
  rows are dense too: freeing one moves the last into its place.
- Replica bit b is bit b % 64 of word b // 64 in masks and in lookup results.
  `width` (words per result row) grows when a bit past 64 * width is stored,
  and never shrinks.

Slots are rebuilt, dropping tombstones, at twice the needed size (at least
MIN_CAPACITY) when live plus tombstones would pass 2/3 of capacity; entry
arrays grow by 1.25x in place and, above SHRINK_ABOVE, shrink when three
quarters are unused. numpy allocates every array in Python (so tracemalloc
sees them); the numba kernels only read and write them in place, and stop to
let Python grow the spill pool when it is full.
Every kernel takes a whole batch of keys: a numba call costs ~1 us to dispatch,
a per-key probe loop in Python ~250 ns per probe.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

EMPTY = -1
DELETED = -2
# Holder ids kept in the entry itself; a block held by more spills to a mask row.
INLINE = 4
NOBODY = 0xFFFF
SPILLED = 0xFFFE
MAX_BITS = SPILLED  # replica bits 0..MAX_BITS-1 fit an inline id
# Small tables churn (a replica storing and evicting a few blocks per batch):
# a floor of 4 KB of slots, and entry arrays of up to 4,096 entries that never
# shrink, keep them from rebuilding on every batch.
MIN_CAPACITY = 1 << 10
SHRINK_ABOVE = 1 << 12
# A store reserves room for its whole batch before the kernel runs; chunking
# bounds the over-reservation when most keys already exist.
CHUNK = 1 << 14
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_ALL = ~np.uint64(0)
_SCAN_CHUNK = 32


@njit(cache=True)
def _home(key: np.uint64, shift: np.uint64) -> np.intp:
    return np.intp((key * _FIBONACCI) >> shift)


@njit(cache=True)
def _find(
    slots: np.ndarray, keys: np.ndarray, key: np.uint64, shift: np.uint64
) -> tuple[np.intp, np.intp]:
    """(the slot holding `key` or -1, the first reusable slot on its path or -1)."""
    last = slots.size - 1
    i = _home(key, shift)
    free = -1
    while True:
        s = slots[i]
        if s == EMPTY:
            return -1, (i if free < 0 else free)
        if s == DELETED:
            if free < 0:
                free = i
        elif keys[s] == key:
            return i, free
        i = (i + 1) & last


@njit(cache=True, inline="always")
def _spill_row(holders: np.ndarray, entry: np.intp) -> np.intp:
    return np.intp(holders[entry, 1]) | (np.intp(holders[entry, 2]) << 16)


@njit(cache=True, inline="always")
def _has(holders: np.ndarray, masks: np.ndarray, entry: np.intp, bit: np.intp) -> bool:
    if holders[entry, 0] == SPILLED:
        return (masks[_spill_row(holders, entry), bit >> 6] >> np.uint64(bit & 63)) & _ONE != 0
    found = False
    for k in range(INLINE):
        found |= holders[entry, k] == bit
    return found


@njit(cache=True)
def _free_spill(
    holders: np.ndarray, masks: np.ndarray, owners: np.ndarray, spilled: np.intp, row: np.intp
) -> np.intp:
    """Free spill row `row` (moving the last into it); returns the new spill count."""
    last = spilled - 1
    if row != last:
        masks[row, :] = masks[last, :]
        owner = owners[last]
        owners[row] = owner
        holders[owner, 1] = row & 0xFFFF
        holders[owner, 2] = row >> 16
    return last


@njit(cache=True)
def _delete(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    owners: np.ndarray,
    size: np.intp,
    shift: np.uint64,
    slot: np.intp,
) -> np.intp:
    """Tombstone `slot`, move the last entry into the freed one; returns the new size.
    The entry's spill row, if any, must be freed already."""
    entry = slots[slot]
    slots[slot] = DELETED
    last = size - 1
    if entry != last:
        moved = keys[last]
        keys[entry] = moved
        holders[entry, :] = holders[last, :]
        if holders[entry, 0] == SPILLED:
            owners[_spill_row(holders, entry)] = entry
        j = _home(moved, shift)
        while slots[j] != last:
            j = (j + 1) & (slots.size - 1)
        slots[j] = entry
    return last


@njit(cache=True, inline="always")
def store_key(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    owners: np.ndarray,
    counts: np.ndarray,
    shift: np.uint64,
    key: np.uint64,
    bit: np.intp,
) -> np.intp:
    """Add `bit` to `key`, inserting it if absent: 0 if added, 1 if the key had it
    already, 2 (nothing changed) if it needs a spill row and the pool is full.
    Room for the entry must be reserved; `counts` is updated in place."""
    slot, free = _find(slots, keys, key, shift)
    if slot < 0:
        size = counts[0]
        if slots[free] == EMPTY:
            counts[1] += 1
        slots[free] = size
        keys[size] = key
        holders[size, :] = NOBODY
        holders[size, 0] = bit
        counts[0] = size + 1
        return 0
    entry = slots[slot]
    if _has(holders, masks, entry, bit):
        return 1
    if holders[entry, 0] == SPILLED:
        masks[_spill_row(holders, entry), bit >> 6] |= _ONE << np.uint64(bit & 63)
        return 0
    for k in range(INLINE):
        if holders[entry, k] == NOBODY:
            holders[entry, k] = bit
            return 0
    row = counts[2]
    if row == masks.shape[0]:
        return 2
    counts[2] = row + 1
    masks[row, :] = _ZERO
    for k in range(INLINE):
        other = np.intp(holders[entry, k])
        masks[row, other >> 6] |= _ONE << np.uint64(other & 63)
    masks[row, bit >> 6] |= _ONE << np.uint64(bit & 63)
    owners[row] = entry
    holders[entry, 0] = SPILLED
    holders[entry, 1] = row & 0xFFFF
    holders[entry, 2] = row >> 16
    holders[entry, 3] = NOBODY
    return 0


@njit(cache=True, inline="always")
def discard_key(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    owners: np.ndarray,
    counts: np.ndarray,
    shift: np.uint64,
    key: np.uint64,
    bit: np.intp,
) -> bool:
    """Remove `bit` from `key` if it has it (the entry goes with its last holder);
    whether it had it. `bit >> 6` must be below the masks' width."""
    slot, _ = _find(slots, keys, key, shift)
    if slot < 0:
        return False
    entry = slots[slot]
    empty = False
    if holders[entry, 0] == SPILLED:
        word, flag = bit >> 6, _ONE << np.uint64(bit & 63)
        row = _spill_row(holders, entry)
        if not masks[row, word] & flag:
            return False
        masks[row, word] &= ~flag
        if not masks[row].any():
            counts[2] = _free_spill(holders, masks, owners, counts[2], row)
            empty = True
    else:
        at = -1
        filled_ids = 0
        for k in range(INLINE):
            if holders[entry, k] == NOBODY:
                break
            if holders[entry, k] == bit:
                at = k
            filled_ids += 1
        if at < 0:
            return False
        holders[entry, at] = holders[entry, filled_ids - 1]
        holders[entry, filled_ids - 1] = NOBODY
        empty = filled_ids == 1
    if empty:
        counts[0] = _delete(slots, keys, holders, owners, counts[0], shift, slot)
    return True


@intrinsic
def _prefetch(typingctx: Any, array: Any, index: Any) -> Any:
    """Ask the cache for row `index` of `array` without waiting for it (LLVM's
    prefetch: a read, kept in every level)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        zero = context.get_constant(types.intp, 0)
        pointer = cgutils.get_item_pointer(
            context,
            builder,
            array_type,
            view,
            [index] + [zero] * (array_type.ndim - 1),
            wraparound=False,
        )
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        builder.call(function, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@njit(cache=True, inline="always")
def warm(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    size: np.intp,
    shift: np.uint64,
    batch: np.ndarray,
    tail: np.intp,
) -> None:
    """Prefetch what a pass of `batch` through `store_key` and `discard_key` will
    read: the home slot of every key and of the last `tail` entries (the ones
    deletions move), then the key and holders of each entry on each key's probe
    path. A probe loop waits for each of its cache misses in turn (on a table
    larger than the caches, a key misses three to five times); prefetches do not
    wait, so the misses of a whole batch overlap."""
    for j in range(batch.size):
        _prefetch(slots, _home(batch[j], shift))
    for entry in range(max(0, size - tail), size):
        _prefetch(slots, _home(keys[entry], shift))
    last = slots.size - 1
    for j in range(batch.size):
        i = _home(batch[j], shift)
        while True:
            entry = slots[i]
            if entry == EMPTY:
                break
            if entry >= 0:
                _prefetch(keys, entry)
                _prefetch(holders, entry)
            i = (i + 1) & last


@njit(cache=True, inline="always")
def shrinkable(slots: np.ndarray, keys: np.ndarray, masks: np.ndarray, counts: np.ndarray) -> bool:
    """Whether `BlockTable._shrink` would resize anything (its conditions, compiled)."""
    size = counts[0]
    return (
        (size < keys.size // 4 and keys.size > SHRINK_ABOVE)
        or (size * 8 < slots.size and slots.size > MIN_CAPACITY)
        or (counts[2] < masks.shape[0] // 4 and masks.shape[0] > SHRINK_ABOVE // 16)
    )


@njit(cache=True, inline="always")
def has_room(
    slots: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    counts: np.ndarray,
    stores: np.intp,
    bit: np.intp,
) -> bool:
    """Whether `stores` stores of `bit` need no `reserve_stores` first."""
    return (
        counts[0] + stores <= keys.size
        and (counts[1] + stores) * 3 <= slots.size * 2
        and bit >> 6 < masks.shape[1]
    )


@njit(cache=True)
def _store(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    owners: np.ndarray,
    counts: np.ndarray,
    shift: np.uint64,
    batch: np.ndarray,
    start: np.intp,
    bit: np.intp,
) -> np.intp:
    """Add `bit` to every key of batch[start:], inserting absent keys. Keys that
    had it already are written, in order, to the front of `batch`.
    `counts` = [size, filled, spill rows, held keys] is updated in place.
    Returns where it stopped: batch.size, or the key that needs a spill row
    when the pool is full."""
    j = start
    while j < batch.size:
        key = batch[j]
        done = store_key(slots, keys, holders, masks, owners, counts, shift, key, bit)
        if done == 2:
            break
        if done == 1:
            batch[counts[3]] = key
            counts[3] += 1
        j += 1
    return j


@njit(cache=True)
def _discard(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    owners: np.ndarray,
    counts: np.ndarray,
    shift: np.uint64,
    batch: np.ndarray,
    bit: np.intp,
) -> np.intp:
    """Remove `bit` from every key that has it; entries left with no holder go.
    Updates counts = [size, filled, spill rows, _] and returns how many keys had it."""
    cleared = 0
    for j in range(batch.size):
        cleared += discard_key(slots, keys, holders, masks, owners, counts, shift, batch[j], bit)
    return cleared


@njit(cache=True)
def _lookup_into(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    shift: np.uint64,
    batch: np.ndarray,
    out: np.ndarray,
) -> None:
    """OR each key's holders into its row of `out` (absent keys add nothing). The
    one place holders become mask bits; written out in the loop, since a helper
    call per key (arrays passed as structs) costs more than the probe."""
    for j in range(batch.size):
        slot, _ = _find(slots, keys, batch[j], shift)
        if slot < 0:
            continue
        entry = slots[slot]
        if holders[entry, 0] == SPILLED:
            spill = _spill_row(holders, entry)
            for w in range(min(out.shape[1], masks.shape[1])):
                out[j, w] |= masks[spill, w]
            continue
        for k in range(INLINE):
            holder = np.intp(holders[entry, k])
            if holder == NOBODY:
                break
            out[j, holder >> 6] |= _ONE << np.uint64(holder & 63)


@njit(cache=True)
def _holding(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    shift: np.uint64,
    batch: np.ndarray,
    bit: np.intp,
    out: np.ndarray,
) -> None:
    for j in range(batch.size):
        slot, _ = _find(slots, keys, batch[j], shift)
        out[j] = slot >= 0 and _has(holders, masks, slots[slot], bit)


@njit(cache=True)
def _prefix_and(
    slots: np.ndarray,
    keys: np.ndarray,
    holders: np.ndarray,
    masks: np.ndarray,
    shift: np.uint64,
    extra_slots: np.ndarray,
    extra_keys: np.ndarray,
    extra_holders: np.ndarray,
    extra_masks: np.ndarray,
    extra_shift: np.uint64,
    use_extra: bool,
    batch: np.ndarray,
    alive: np.ndarray,
    out: np.ndarray,
    first: bool,
) -> np.intp:
    """Row j of `out` becomes `alive` (if `first`, else row j itself) AND the
    holders of keys 0..j, each or'ed with the extra table's. An empty `alive`
    stands for every replica. Stops at the first all-zero row and returns its
    index (the number of live rows).

    Rows only shrink, so the scan carries `running` (row j-1, or the start set)
    and ANDs each key's holders into it, over the words still non-zero. Keys are
    looked up _SCAN_CHUNK at a time, so a scan that dies early probes little past
    its end."""
    width = out.shape[1]
    running = np.empty(width, np.uint64)
    for w in range(width):
        if not first:
            running[w] = out[0, w] if batch.size else _ZERO
        elif alive.size:
            running[w] = alive[w]
        else:
            running[w] = _ALL
    held = np.empty((_SCAN_CHUNK, width), np.uint64)
    low, high = 0, width
    for start in range(0, batch.size, _SCAN_CHUNK):
        end = min(batch.size, start + _SCAN_CHUNK)
        chunk = batch[start:end]
        held[:] = _ZERO
        _lookup_into(slots, keys, holders, masks, shift, chunk, held)
        if use_extra:
            _lookup_into(
                extra_slots, extra_keys, extra_holders, extra_masks, extra_shift, chunk, held
            )
        for j in range(start, end):
            live = False
            new_low, new_high = high, low
            for w in range(low, high):
                row = running[w] & held[j - start, w]
                if not first:
                    row &= out[j, w]
                running[w] = row
                if row != _ZERO:
                    live = True
                    new_low = min(new_low, w)
                    new_high = max(new_high, w + 1)
            for w in range(width):
                out[j, w] = running[w] if low <= w < high else _ZERO
            if not live:
                return j
            low, high = new_low, new_high
    return batch.size


@njit(cache=True)
def _with_bit(holders: np.ndarray, masks: np.ndarray, size: np.intp, bit: np.intp) -> np.ndarray:
    """Entries 0..size-1 holding `bit`, as a bool array."""
    out = np.zeros(size, np.bool_)
    for entry in range(size):
        out[entry] = _has(holders, masks, entry, bit)
    return out


@njit(cache=True)
def _rebuild(slots: np.ndarray, keys: np.ndarray, size: np.intp, shift: np.uint64) -> None:
    """Index entries 0..size-1 into `slots`, which must be all EMPTY."""
    last = slots.size - 1
    for entry in range(size):
        i = _home(keys[entry], shift)
        while slots[i] != EMPTY:
            i = (i + 1) & last
        slots[i] = entry


def mask_ints(masks: np.ndarray, span_row: np.ndarray | None = None) -> list[int]:
    """Rows of mask words (word 0 lowest) as Python ints. Only the words that
    are non-zero in some row are converted (or in `span_row`, if every row is
    a subset of it), so a wide table whose rows hold few replicas converts
    like a narrow one."""
    if masks.shape[1] == 1:
        return masks[:, 0].tolist()
    used = np.flatnonzero(masks.any(axis=0) if span_row is None else span_row)
    if not used.size:
        return [0] * masks.shape[0]
    low, high = int(used[0]), int(used[-1]) + 1
    if high - low == 1:
        words = masks[:, low].tolist()
        return words if low == 0 else [word << 64 * low for word in words]
    raw = np.ascontiguousarray(masks[:, low:high], dtype="<u8").tobytes()
    step = 8 * (high - low)
    shift = 64 * low
    return [int.from_bytes(raw[i : i + step], "little") << shift for i in range(0, len(raw), step)]


@cache
def warm_up() -> None:
    """Compile every kernel now, or load it from numba's on-disk cache: a cold
    compile takes seconds, which belongs at startup, not in the first request."""
    table, extra = BlockTable(), BlockTable()
    keys = np.arange(1, 4, dtype=np.uint64)
    extra.store(keys.copy(), 0)
    for bit in range(INLINE + 1):
        table.store(keys.copy(), bit)
    out = np.zeros((keys.size, 1), np.uint64)
    table.lookup_into(keys, out)
    table.holding(keys, 0)
    table.prefix_and(keys, extra, np.empty(0, np.uint64), out, True)
    table.discard(keys[:1], 0)
    table.clear_bit(0)
    table.store(np.arange(1, MIN_CAPACITY, dtype=np.uint64), 0)  # grows: rehashes


class BlockTable:
    """uint64 key -> the replica bits holding it, with batch operations only."""

    __slots__ = ("_counts", "_holders", "_keys", "_masks", "_owners", "_shift", "_slots", "_width")

    def __init__(self) -> None:
        # size (live entries), filled (live entries plus tombstones, in slots),
        # spill rows in use, scratch: one array, so kernels update them in place.
        self._counts = np.zeros(4, np.intp)
        self._keys = np.empty(0, np.uint64)
        self._holders = np.empty((0, INLINE), np.uint16)
        self._masks = np.zeros((0, 1), np.uint64)
        self._owners = np.empty(0, np.intp)
        self._slots = np.full(MIN_CAPACITY, EMPTY, np.int32)
        self._shift = np.uint64(64 - MIN_CAPACITY.bit_length() + 1)
        self._width = 1

    def __len__(self) -> int:
        return int(self._counts[0])

    @property
    def _size(self) -> int:
        return int(self._counts[0])

    @property
    def width(self) -> int:
        """Words per lookup row: 64 replica bits each, enough for every bit stored."""
        return self._width

    @property
    def capacity(self) -> int:
        """Slots in the index array (a power of two)."""
        return self._slots.size

    def store(self, keys: np.ndarray, bit: int) -> np.ndarray:
        """Set `bit` for every key (a uint64 array, which is overwritten).
        Returns, in order, the keys whose bit was already set: repeated keys
        and keys stored before."""
        if keys.size > CHUNK:
            parts = [self.store(keys[i : i + CHUNK], bit) for i in range(0, keys.size, CHUNK)]
            return np.concatenate(parts)
        if not 0 <= bit < MAX_BITS:
            raise ValueError(f"replica bit {bit} is out of range: at most {MAX_BITS} replicas")
        self._width = max(self._width, (bit >> 6) + 1)
        if self._width > self._masks.shape[1]:
            self._widen_masks(self._width)
        self._reserve(keys.size)
        counts = self._counts
        counts[3] = 0
        start = 0
        while True:
            start = _store(
                self._slots,
                self._keys,
                self._holders,
                self._masks,
                self._owners,
                counts,
                self._shift,
                keys,
                start,
                bit,
            )
            if start == keys.size:
                break
            self.grow_spill()
        return keys[: counts[3]]

    def parts(self) -> tuple[np.ndarray, ...]:
        """The arrays a fused kernel (`scanned_ingest.py`) reads and updates in place,
        in the kernels' order: slots, keys, holders, masks, owners, counts, and the
        shift as a 0-d array. Valid until the next Python-side call."""
        return (
            self._slots,
            self._keys,
            self._holders,
            self._masks,
            self._owners,
            self._counts,
            self._shift,
        )

    def reserve_stores(self, count: int, bit: int) -> None:
        """Make room for `count` stores of `bit` (entries and slots; spill rows are
        grown when a kernel storing through `store_key` runs out: `grow_spill`)."""
        if not 0 <= bit < MAX_BITS:
            raise ValueError(f"replica bit {bit} is out of range: at most {MAX_BITS} replicas")
        self._width = max(self._width, (bit >> 6) + 1)
        if self._width > self._masks.shape[1]:
            self._widen_masks(self._width)
        self._reserve(count)

    def grow_spill(self) -> None:
        """More spill rows, when a kernel storing through `store_key` ran out."""
        self._resize_spill(max(16, self._masks.shape[0] + self._masks.shape[0] // 4))

    def settle(self) -> None:
        """After a kernel removed entries through `discard_key`: shrink what is unused."""
        self._shrink()

    def discard(self, keys: np.ndarray, bit: int) -> int:
        """Clear `bit` for every key; returns how many keys had it."""
        if not 0 <= bit < MAX_BITS or bit >> 6 >= self._width or not self._size:
            return 0
        cleared = _discard(
            self._slots,
            self._keys,
            self._holders,
            self._masks,
            self._owners,
            self._counts,
            self._shift,
            keys,
            bit,
        )
        self._shrink()
        return int(cleared)

    def lookup_into(self, keys: np.ndarray, out: np.ndarray) -> None:
        """OR each key's mask into its row of `out` (uint64[len(keys), >= width])."""
        if self._size:
            _lookup_into(
                self._slots, self._keys, self._holders, self._masks, self._shift, keys, out
            )

    def prefix_and(
        self,
        keys: np.ndarray,
        extra: BlockTable | None,
        alive: np.ndarray,
        out: np.ndarray,
        first: bool,
    ) -> int:
        """Prefix-AND of the keys' masks (each or'ed with `extra`'s) into `out`:
        row j = (`alive` if `first`, else row j) AND masks of keys 0..j, where
        an empty `alive` stands for every replica. Stops at the first all-zero
        row; returns the number of live rows before it."""
        other = self if extra is None else extra
        return int(
            _prefix_and(
                self._slots,
                self._keys,
                self._holders,
                self._masks,
                self._shift,
                other._slots,
                other._keys,
                other._holders,
                other._masks,
                other._shift,
                extra is not None,
                keys,
                alive,
                out,
                first,
            )
        )

    def holding(self, keys: np.ndarray, bit: int) -> np.ndarray:
        """Which of `keys` have `bit` set, as a bool array."""
        out = np.zeros(keys.size, bool)
        if 0 <= bit < MAX_BITS and bit >> 6 < self._width and self._size:
            _holding(
                self._slots, self._keys, self._holders, self._masks, self._shift, keys, bit, out
            )
        return out

    def clear_bit(self, bit: int) -> None:
        """Clear `bit` in every entry: a full scan, for replica death or reset."""
        if not 0 <= bit < MAX_BITS or bit >> 6 >= self._width or not self._size:
            return
        size = self._size
        held = self._keys[:size][_with_bit(self._holders, self._masks, size, bit)]
        self.discard(held, bit)

    def count_bit(self, bit: int) -> int:
        """Entries with `bit` set."""
        if not 0 <= bit < MAX_BITS or bit >> 6 >= self._width or not self._size:
            return 0
        return int(np.count_nonzero(_with_bit(self._holders, self._masks, self._size, bit)))

    def _reserve(self, count: int) -> None:
        """Make room for `count` more entries, so the kernel never runs out."""
        need = self._size + count
        allocated = self._keys.size
        if need > allocated:
            self._resize_entries(max(need, allocated + allocated // 4, 16))
        if (int(self._counts[1]) + count) * 3 > self._slots.size * 2:
            self._rehash(need)

    def _rehash(self, need: int) -> None:
        """New slots for `need` entries at load <= 1/2, tombstones dropped."""
        capacity = max(MIN_CAPACITY, 1 << (2 * need - 1).bit_length())
        self._slots = np.full(capacity, EMPTY, np.int32)
        self._shift = np.uint64(64 - capacity.bit_length() + 1)
        _rebuild(self._slots, self._keys, self._size, self._shift)
        self._counts[1] = self._size

    def _shrink(self) -> None:
        """Resize what is mostly unused (`shrinkable` says whether anything is)."""
        size = self._size
        if size < self._keys.size // 4 and self._keys.size > SHRINK_ABOVE:
            self._resize_entries(max(size + size // 4, 16))
        if size * 8 < self._slots.size and self._slots.size > MIN_CAPACITY:
            self._rehash(size)
        spilled, rows = int(self._counts[2]), self._masks.shape[0]
        if spilled < rows // 4 and rows > SHRINK_ABOVE // 16:
            self._resize_spill(max(spilled + spilled // 4, 16))

    def _resize_entries(self, allocated: int) -> None:
        # In place (realloc, often a page remap): the arrays are never shared.
        self._keys.resize(allocated, refcheck=False)
        self._holders.resize((allocated, INLINE), refcheck=False)

    def _resize_spill(self, rows: int) -> None:
        self._masks.resize((rows, self._masks.shape[1]), refcheck=False)
        self._owners.resize(rows, refcheck=False)

    def _widen_masks(self, width: int) -> None:
        masks = np.zeros((self._masks.shape[0], width), np.uint64)
        spilled = int(self._counts[2])
        masks[:spilled, : self._masks.shape[1]] = self._masks[:spilled]
        self._masks = masks
