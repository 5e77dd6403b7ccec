"""`PromptMasks.prefix_run`: each replica's run of leading blocks, scanned once and
extended on demand, equals a brute-force walk over the tables' masks."""

from __future__ import annotations

import numpy as np
import pytest

from kvroute.router.index.block_table import BlockTable
from kvroute.router.index.view import PromptMasks


def brute_runs(tables: list[BlockTable], keys: np.ndarray, bits: int) -> dict[int, int]:
    """Per bit, the leading keys it holds in every table."""
    held = []
    for table in tables:
        out = np.zeros((keys.size, 2), np.uint64)
        table.lookup_into(keys, out)
        held.append(out)
    runs = {}
    for bit in range(bits):
        word, flag = bit >> 6, np.uint64(1 << (bit & 63))
        length = 0
        while length < keys.size and all(h[length, word] & flag for h in held):
            length += 1
        runs[bit] = length
    return runs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("steps", [(40,), (3, 7, 40), (1, 1, 2, 5, 13, 40)])
def test_prefix_run_equals_a_walk_over_the_masks_however_it_is_extended(
    seed: int, steps: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(seed)
    keys = np.arange(1, 41, dtype=np.uint64)
    bits = 70  # two mask words
    tables = [BlockTable(), BlockTable()]
    for bit in range(bits):
        for table in tables:
            # A prefix of random length, then random holes past it.
            length = int(rng.integers(0, 41))
            held = keys[:length].copy()
            tail = keys[length:][rng.random(40 - length) < 0.5]
            table.store(np.concatenate([held, tail]), bit)
    expected = brute_runs(tables, keys, bits)
    masks = PromptMasks(tables, None, keys, [1, 1])
    for max_blocks in steps:
        run = masks.prefix_run([0, 1], max_blocks)
        for bit in range(bits):
            assert min(run.run_length(bit), max_blocks) == min(expected[bit], max_blocks)
    assert run.first == sum(1 << bit for bit, length in expected.items() if length)


def test_a_prefix_nobody_holds_has_no_run() -> None:
    table = BlockTable()
    table.store(np.array([2, 3], np.uint64), 5)
    masks = PromptMasks([table], None, np.array([1, 2, 3], np.uint64), [1])
    run = masks.prefix_run([0], 3)
    assert (run.first, run.run_length(5), run.alive) == (0, 0, None)
