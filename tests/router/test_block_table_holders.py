"""BlockTable's holder layout: a few replica ids inline, a bitmask row past them.

Checked against a dict model with many bits per key, so entries spill to mask
rows, lose holders, and are moved by deletes while spilled; and the per-entry
memory that makes the layout worth having.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.router.index.block_table import INLINE, MAX_BITS, BlockTable, mask_ints
from tests.router.test_block_table import COLLIDING, keys, lookup

KEY_POOL = [*COLLIDING[:6], 0, 1, 2**64 - 1]
BITS = [0, 1, 2, 3, 5, 63, 64, 65, 130, 700, 1023]
operations = st.lists(
    st.tuples(
        st.sampled_from(["store", "discard", "clear"]),
        st.lists(st.sampled_from(KEY_POOL), max_size=9),
        st.sampled_from(BITS),
    ),
    max_size=60,
)


def _prefix_model(model: dict[int, int], values: list[int], alive: int) -> list[int]:
    rows, running = [], alive
    for key in values:
        running &= model.get(key, 0)
        rows.append(running)
        if not running:
            break
    return rows


@settings(max_examples=300, deadline=None)
@given(operations)
def test_spilled_and_inline_holders_match_a_dict_model(
    ops: list[tuple[str, list[int], int]],
) -> None:
    table = BlockTable()
    model: dict[int, int] = {}
    for op, values, bit in ops:
        flag = 1 << bit
        if op == "store":
            held = [
                key
                for i, key in enumerate(values)
                if (model.get(key, 0) & flag) or key in values[:i]
            ]
            for key in values:
                model[key] = model.get(key, 0) | flag
            assert table.store(keys(values), bit).tolist() == held
        elif op == "discard":
            cleared = 0
            for key in values:
                if model.get(key, 0) & flag:
                    cleared += 1
                    model[key] &= ~flag
                    if not model[key]:
                        del model[key]
            assert table.discard(keys(values), bit) == cleared
        else:
            for key in list(model):
                model[key] &= ~flag
                if not model[key]:
                    del model[key]
            table.clear_bit(bit)
        assert len(table) == len(model)
        assert lookup(table, KEY_POOL) == [model.get(key, 0) for key in KEY_POOL]
        assert table.holding(keys(KEY_POOL), bit).tolist() == [
            bool(model.get(key, 0) & flag) for key in KEY_POOL
        ]
        for probe in BITS:
            assert table.count_bit(probe) == sum(1 for m in model.values() if m >> probe & 1)
        out = np.empty((len(KEY_POOL), table.width), np.uint64)
        live = table.prefix_and(keys(KEY_POOL), None, np.empty(0, np.uint64), out, True)
        expected = _prefix_model(model, KEY_POOL, (1 << 64 * table.width) - 1)
        assert mask_ints(out[: len(expected)]) == expected
        assert live == (len(expected) if expected and expected[-1] else len(expected) - 1)


def test_a_key_held_by_many_replicas_spills_and_goes_with_its_last_holder() -> None:
    table = BlockTable()
    holders = list(range(0, 1024, 37))
    for bit in holders:
        table.store(keys([9, 10]), bit)
    assert len(holders) > INLINE
    assert lookup(table, [9, 10]) == [sum(1 << b for b in holders)] * 2
    for bit in holders:
        table.discard(keys([9]), bit)
    assert (len(table), lookup(table, [9, 10])) == (1, [0, sum(1 << b for b in holders)])
    table.store(keys([9]), 5)
    assert lookup(table, [9]) == [1 << 5]


def test_a_bit_past_the_inline_id_range_is_refused() -> None:
    with pytest.raises(ValueError, match="at most"):
        BlockTable().store(keys([1]), MAX_BITS)


def test_an_entry_held_by_a_few_of_1024_replicas_costs_under_40_bytes() -> None:
    table = BlockTable()
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**63, 200_000, dtype=np.uint64)
    for holder in range(4):
        table.store(values.copy(), 1020 + holder)
    arrays = (table._keys, table._holders, table._masks, table._owners, table._slots)
    assert sum(a.nbytes for a in arrays) / len(table) < 40
