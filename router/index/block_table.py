"""A compact hash table from 64-bit block keys to replica bitmasks.

Why not a `dict[int, int]`: each entry costs a Python int key object plus the
dict's own slot, about 78 B at 1M entries. Here an entry costs its key (8 B),
its mask (8 B per 64 replica bits) and 6-16 B of slot array (up to ~32 B after
many deletes: slots shrink only below 1/8 load).

Layout, after CPython's compact dict:
- `slots`: int32[capacity], a power of two. A slot is EMPTY, DELETED (a
  tombstone, which keeps probe chains intact) or the index of an entry. A key's
  home slot is the top bits of key * 2^64/phi (Fibonacci hashing), so keys
  sharing low bits (small ints in tests, structured hashes) still spread;
  collisions probe linearly.
- `keys`: uint64[n] and `masks`: uint64[n, width] are dense: entries 0..size-1
  are live. Deleting an entry moves the last one into its place and re-points
  that entry's slot, so there are no holes.
- Replica bit b is bit b % 64 of word b // 64. `width` grows when a bit past
  64 * width is stored, and never shrinks.

Slots are rebuilt, dropping tombstones, at twice the needed size (at least
MIN_CAPACITY) when live plus tombstones would pass 2/3 of capacity; entry
arrays grow by 1.25x in place and, above SHRINK_ABOVE, shrink when three
quarters are unused. numpy allocates every array in Python (so tracemalloc
sees them); the numba kernels only read and write them in place.
Every kernel takes a whole batch of keys: a numba call costs ~1 us to dispatch,
a per-key probe loop in Python ~250 ns per probe.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit

EMPTY = -1
DELETED = -2
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


@njit(cache=True)
def _row_is_empty(masks: np.ndarray, entry: np.intp) -> bool:
    return not masks[entry].any()


@njit(cache=True)
def _delete(
    slots: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    size: np.intp,
    shift: np.uint64,
    slot: np.intp,
) -> np.intp:
    """Tombstone `slot`, move the last entry into the freed one; returns the new size."""
    entry = slots[slot]
    slots[slot] = DELETED
    last = size - 1
    if entry != last:
        moved = keys[last]
        keys[entry] = moved
        masks[entry, :] = masks[last, :]
        j = _home(moved, shift)
        while slots[j] != last:
            j = (j + 1) & (slots.size - 1)
        slots[j] = entry
    return last


@njit(cache=True)
def _store(
    slots: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    size: np.intp,
    filled: np.intp,
    shift: np.uint64,
    batch: np.ndarray,
    word: np.intp,
    flag: np.uint64,
) -> tuple[np.intp, np.intp, np.intp]:
    """Set `flag` in word `word` for every key, inserting absent keys. Keys whose
    flag was already set are written, in order, to the front of `batch`.
    Returns (size, filled, number of such keys)."""
    held = 0
    for j in range(batch.size):
        key = batch[j]
        slot, free = _find(slots, keys, key, shift)
        if slot >= 0:
            entry = slots[slot]
            if masks[entry, word] & flag:
                batch[held] = key
                held += 1
            else:
                masks[entry, word] |= flag
        else:
            if slots[free] == EMPTY:
                filled += 1
            slots[free] = size
            keys[size] = key
            masks[size, :] = _ZERO
            masks[size, word] = flag
            size += 1
    return size, filled, held


@njit(cache=True)
def _discard(
    slots: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    size: np.intp,
    shift: np.uint64,
    batch: np.ndarray,
    word: np.intp,
    flag: np.uint64,
) -> tuple[np.intp, np.intp]:
    """Clear `flag` for every key that has it; entries left with no bit go.
    Returns (size, number of keys that had the flag)."""
    cleared = 0
    for j in range(batch.size):
        slot, _ = _find(slots, keys, batch[j], shift)
        if slot < 0:
            continue
        entry = slots[slot]
        if not masks[entry, word] & flag:
            continue
        cleared += 1
        masks[entry, word] &= ~flag
        if _row_is_empty(masks, entry):
            size = _delete(slots, keys, masks, size, shift, slot)
    return size, cleared


@njit(cache=True)
def _lookup_into(
    slots: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    shift: np.uint64,
    batch: np.ndarray,
    out: np.ndarray,
) -> None:
    """OR each key's mask into its row of `out` (absent keys add nothing)."""
    width = masks.shape[1]
    for j in range(batch.size):
        slot, _ = _find(slots, keys, batch[j], shift)
        if slot >= 0:
            entry = slots[slot]
            for w in range(width):
                out[j, w] |= masks[entry, w]


@njit(cache=True)
def _prefix_and(
    slots: np.ndarray,
    keys: np.ndarray,
    masks: np.ndarray,
    shift: np.uint64,
    extra_slots: np.ndarray,
    extra_keys: np.ndarray,
    extra_masks: np.ndarray,
    extra_shift: np.uint64,
    use_extra: bool,
    batch: np.ndarray,
    alive: np.ndarray,
    out: np.ndarray,
    first: bool,
) -> np.intp:
    """Row j of `out` becomes `alive` (if `first`, else row j itself) AND the
    masks of keys 0..j, each or'ed with the extra table's. An empty `alive`
    stands for every replica. Stops at the first all-zero row and returns its
    index (the number of live rows)."""
    width = out.shape[1]
    running = np.full(width, ~_ZERO)
    for j in range(batch.size):
        key = batch[j]
        slot, _ = _find(slots, keys, key, shift)
        entry = slots[slot] if slot >= 0 else -1
        extra_entry = -1
        if use_extra:
            extra_slot, _ = _find(extra_slots, extra_keys, key, extra_shift)
            if extra_slot >= 0:
                extra_entry = extra_slots[extra_slot]
        live = False
        for w in range(width):
            mask = _ZERO
            if entry >= 0 and w < masks.shape[1]:
                mask = masks[entry, w]
            if extra_entry >= 0 and w < extra_masks.shape[1]:
                mask |= extra_masks[extra_entry, w]
            running[w] &= mask
            if not first:
                row = running[w] & out[j, w]
            elif alive.size:
                row = running[w] & alive[w]
            else:
                row = running[w]
            out[j, w] = row
            live = live or row != _ZERO
        if not live:
            return j
    return batch.size


@njit(cache=True)
def _sweep(
    keys: np.ndarray, masks: np.ndarray, size: np.intp, word: np.intp, flag: np.uint64
) -> np.intp:
    """Clear `flag` everywhere and compact away entries left with no bit, in
    order. Returns the new size; slots must be rebuilt if it shrank."""
    kept = 0
    for entry in range(size):
        masks[entry, word] &= ~flag
        if _row_is_empty(masks, entry):
            continue
        if kept != entry:
            keys[kept] = keys[entry]
            masks[kept, :] = masks[entry, :]
        kept += 1
    return kept


@njit(cache=True)
def _rebuild(slots: np.ndarray, keys: np.ndarray, size: np.intp, shift: np.uint64) -> None:
    """Index entries 0..size-1 into `slots`, which must be all EMPTY."""
    last = slots.size - 1
    for entry in range(size):
        i = _home(keys[entry], shift)
        while slots[i] != EMPTY:
            i = (i + 1) & last
        slots[i] = entry


_FLAGS = tuple(np.uint64(1 << i) for i in range(64))


def _bit(bit: int) -> tuple[int, np.uint64]:
    return bit >> 6, _FLAGS[bit & 63]


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
    table.store(keys.copy(), 0)
    out = np.zeros((keys.size, 1), np.uint64)
    table.lookup_into(keys, out)
    table.prefix_and(keys, extra, np.empty(0, np.uint64), out, True)
    table.discard(keys[:1], 0)
    table.clear_bit(0)


class BlockTable:
    """uint64 key -> replica bitmask, with batch operations only."""

    __slots__ = ("_filled", "_keys", "_masks", "_shift", "_size", "_slots")

    def __init__(self) -> None:
        self._size = 0
        self._filled = 0  # live entries plus tombstones, in slots
        self._keys = np.empty(0, np.uint64)
        self._masks = np.zeros((0, 1), np.uint64)
        self._slots = np.full(MIN_CAPACITY, EMPTY, np.int32)
        self._shift = np.uint64(64 - MIN_CAPACITY.bit_length() + 1)

    def __len__(self) -> int:
        return self._size

    @property
    def width(self) -> int:
        """Mask words per entry: 64 replica bits each."""
        return self._masks.shape[1]

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
        word, flag = _bit(bit)
        if word >= self._masks.shape[1]:
            self._widen(word + 1)
        self._reserve(keys.size)
        self._size, self._filled, held = _store(
            self._slots,
            self._keys,
            self._masks,
            self._size,
            self._filled,
            self._shift,
            keys,
            word,
            flag,
        )
        return keys[:held]

    def discard(self, keys: np.ndarray, bit: int) -> int:
        """Clear `bit` for every key; returns how many keys had it."""
        word, flag = _bit(bit)
        if word >= self.width or not self._size:
            return 0
        self._size, cleared = _discard(
            self._slots, self._keys, self._masks, self._size, self._shift, keys, word, flag
        )
        self._shrink()
        return cleared

    def lookup_into(self, keys: np.ndarray, out: np.ndarray) -> None:
        """OR each key's mask into its row of `out` (uint64[len(keys), >= width])."""
        if self._size:
            _lookup_into(self._slots, self._keys, self._masks, self._shift, keys, out)

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
        return _prefix_and(
            self._slots,
            self._keys,
            self._masks,
            self._shift,
            other._slots,
            other._keys,
            other._masks,
            other._shift,
            extra is not None,
            keys,
            alive,
            out,
            first,
        )

    def holding(self, keys: np.ndarray, bit: int) -> np.ndarray:
        """Which of `keys` have `bit` set, as a bool array."""
        word, flag = _bit(bit)
        if word >= self.width or not self._size:
            return np.zeros(keys.size, bool)
        out = np.zeros((keys.size, self.width), np.uint64)
        self.lookup_into(keys, out)
        return out[:, word] & flag != 0

    def clear_bit(self, bit: int) -> None:
        """Clear `bit` in every entry: a full sweep, for replica death or reset."""
        word, flag = _bit(bit)
        if word >= self.width or not self._size:
            return
        size = _sweep(self._keys, self._masks, self._size, word, flag)
        if size != self._size:
            self._size = size
            self._rehash(size)
            self._shrink()

    def count_bit(self, bit: int) -> int:
        """Entries with `bit` set."""
        word, flag = _bit(bit)
        if word >= self.width:
            return 0
        return int(np.count_nonzero(self._masks[: self._size, word] & flag))

    def _reserve(self, count: int) -> None:
        """Make room for `count` more entries, so the kernel never runs out."""
        need = self._size + count
        allocated = self._keys.size
        if need > allocated:
            self._resize_entries(max(need, allocated + allocated // 4, 16))
        if (self._filled + count) * 3 > self._slots.size * 2:
            self._rehash(need)

    def _rehash(self, need: int) -> None:
        """New slots for `need` entries at load <= 1/2, tombstones dropped."""
        capacity = max(MIN_CAPACITY, 1 << (2 * need - 1).bit_length())
        self._slots = np.full(capacity, EMPTY, np.int32)
        self._shift = np.uint64(64 - capacity.bit_length() + 1)
        _rebuild(self._slots, self._keys, self._size, self._shift)
        self._filled = self._size

    def _shrink(self) -> None:
        size = self._size
        if size < self._keys.size // 4 and self._keys.size > SHRINK_ABOVE:
            self._resize_entries(max(size + size // 4, 16))
        if size * 8 < self._slots.size and self._slots.size > MIN_CAPACITY:
            self._rehash(size)

    def _resize_entries(self, allocated: int) -> None:
        # In place (realloc, often a page remap): the arrays are never shared.
        self._keys.resize(allocated, refcheck=False)
        self._masks.resize((allocated, self._masks.shape[1]), refcheck=False)

    def _widen(self, width: int) -> None:
        masks = np.zeros((self._keys.size, width), np.uint64)
        masks[: self._size, : self.width] = self._masks[: self._size]
        self._masks = masks
