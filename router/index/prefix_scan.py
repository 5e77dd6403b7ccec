"""Where each replica's run of leading blocks ends, from a prefix scan's rows.

`BlockTable.prefix_and` gives, row by row, the replicas holding every block so
far; rows only lose bits. A replica's hit needs only the row where its bit goes,
so one compiled pass turns the rows into (bit, run length) pairs for the bits
that leave, instead of a Python int per row.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import njit

_ONE = np.uint64(1)


@njit(cache=True, inline="always")
def _emit(word: np.uint64, w: int, length: int, bits: np.ndarray, ends: np.ndarray, n: int) -> int:
    while word:
        low = word & (~word + _ONE)
        bit = 0
        probe = low
        while probe > _ONE:
            probe >>= _ONE
            bit += 1
        bits[n] = 64 * w + bit
        ends[n] = length
        n += 1
        word ^= low
    return n


@njit(cache=True)
def run_ends(
    rows: np.ndarray, live: int, previous: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """(bits, run lengths) of the replicas whose run ends within `rows`, the scan of
    blocks start..start+len(rows)-1 of which the first `live` rows are non-zero
    (then, if `live` < len(rows), nobody is left). `previous`: the row before
    block `start` (empty at block 0, where bits absent from the first row hold
    nothing and are not listed). A run ending at row j has length start + j."""
    # Every row is a subset of the first (and of `previous`): only its words count.
    span = previous if previous.size else rows[0]
    low, high = span.size, 0
    count = 0
    for w in range(span.size):
        if span[w]:
            low, high = min(low, w), w + 1
            count += 64
    bits = np.empty(count, np.int64)
    ends = np.empty(count, np.int64)
    n = 0
    if previous.size:
        for w in range(low, high):
            head = previous[w] & ~rows[0, w] if live else previous[w]
            n = _emit(head, w, start, bits, ends, n)
    for j in range(1, live):
        for w in range(low, high):
            n = _emit(rows[j - 1, w] & ~rows[j, w], w, start + j, bits, ends, n)
    if 0 < live < rows.shape[0]:
        for w in range(low, high):
            n = _emit(rows[live - 1, w], w, start + live, bits, ends, n)
    return bits[:n], ends[:n]


@cache
def warm_up() -> None:
    """Compile `run_ends` now (or load it from numba's disk cache), not in the
    first request."""
    run_ends(np.ones((2, 1), np.uint64), 1, np.ones(1, np.uint64), 1)
