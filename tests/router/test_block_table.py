"""BlockTable: exact key -> replica mask semantics under collisions, growth,
deletion and wide masks, checked against a dict model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.router.index.block_table import MIN_CAPACITY, BlockTable, _home, mask_ints

# Keys whose Fibonacci products differ only in their low bits share a home
# slot at every capacity below 2^56, so they all collide.
_INVERSE = pow(0x9E3779B97F4A7C15, -1, 1 << 64)
COLLIDING = [(((0xABCD << 48) + i) * _INVERSE) % (1 << 64) for i in range(64)]


def keys(values: list[int]) -> np.ndarray:
    return np.array(values, np.uint64)


def lookup(table: BlockTable, values: list[int]) -> list[int]:
    out = np.zeros((len(values), table.width), np.uint64)
    table.lookup_into(keys(values), out)
    return mask_ints(out)


def test_colliding_keys_share_a_home_slot() -> None:
    for capacity_bits in (3, 10, 20):
        shift = np.uint64(64 - capacity_bits)
        assert len({_home(np.uint64(key), shift) for key in COLLIDING}) == 1


def test_stored_keys_are_found_with_their_bits_and_absent_keys_are_zero() -> None:
    table = BlockTable()
    table.store(keys([1, 2, 3]), 0)
    table.store(keys([2, 3]), 5)
    assert lookup(table, [1, 2, 3, 4]) == [1, 1 | 32, 1 | 32, 0]
    assert len(table) == 3


def test_colliding_keys_are_kept_apart() -> None:
    table = BlockTable()
    table.store(keys(COLLIDING[:40]), 1)
    table.store(keys(COLLIDING[::2]), 2)
    expected = [(2 if i < 40 else 0) | (4 if i % 2 == 0 else 0) for i in range(64)]
    assert lookup(table, COLLIDING) == expected
    assert len(table) == 40 + 12


def test_deleting_inside_a_collision_chain_keeps_later_keys_reachable() -> None:
    table = BlockTable()
    table.store(keys(COLLIDING[:10]), 0)
    assert table.discard(keys(COLLIDING[2:8:2]), 0) == 3
    assert lookup(table, COLLIDING[:10]) == [1, 1, 0, 1, 0, 1, 0, 1, 1, 1]
    # A re-inserted key reuses a tombstone and is found again.
    table.store(keys([COLLIDING[4]]), 3)
    assert lookup(table, COLLIDING[:10]) == [1, 1, 0, 1, 8, 1, 0, 1, 1, 1]
    assert len(table) == 8


def test_swap_delete_repoints_the_entry_moved_into_the_hole() -> None:
    table = BlockTable()
    table.store(keys([10, 20, 30, 40]), 0)
    table.store(keys([40]), 1)
    # 10 is entry 0; deleting it moves 40 (the last entry) into entry 0.
    assert table.discard(keys([10]), 0) == 1
    assert lookup(table, [10, 20, 30, 40]) == [0, 1, 1, 3]
    assert table.discard(keys([40]), 0) == 1
    assert table.discard(keys([40, 20]), 1) == 1
    assert lookup(table, [10, 20, 30, 40]) == [0, 1, 1, 0]
    assert len(table) == 2


def test_a_key_keeps_its_entry_until_its_last_bit_goes() -> None:
    table = BlockTable()
    table.store(keys([7]), 0)
    table.store(keys([7]), 1)
    assert table.discard(keys([7]), 0) == 1
    assert (len(table), lookup(table, [7])) == (1, [2])
    assert table.discard(keys([7]), 0) == 0
    assert table.discard(keys([7]), 1) == 1
    assert (len(table), lookup(table, [7])) == (0, [0])


def test_store_returns_the_keys_whose_bit_was_already_set_in_order() -> None:
    table = BlockTable()
    table.store(keys([1, 2]), 0)
    held = table.store(keys([3, 2, 3, 1, 4]), 0)
    assert held.tolist() == [2, 3, 1]
    assert table.store(keys([5]), 1).tolist() == []


def test_growth_keeps_every_key_and_load_below_two_thirds() -> None:
    table = BlockTable()
    values = list(range(1, 50_001))
    for start in range(0, len(values), 1000):
        table.store(keys(values[start : start + 1000]), 3)
    assert len(table) == 50_000
    assert lookup(table, values) == [8] * 50_000
    assert table.capacity * 2 >= 50_000 * 3


def test_tombstones_are_dropped_by_a_rebuild_so_churn_does_not_grow_the_table() -> None:
    table = BlockTable()
    live = list(range(1, 1001))
    table.store(keys(live), 0)
    capacity = table.capacity
    for round_ in range(1, 50):
        fresh = list(range(round_ * 1000 + 1, round_ * 1000 + 1001))
        table.store(keys(fresh), 0)
        assert table.discard(keys(live), 0) == 1000
        live = fresh
    assert len(table) == 1000
    assert table.capacity <= 2 * capacity
    assert lookup(table, [*live, 1, 2]) == [1] * 1000 + [0, 0]


def test_a_table_emptied_by_discards_shrinks_to_its_floor() -> None:
    table = BlockTable()
    values = list(range(1, 10_001))
    table.store(keys(values), 0)
    assert table.capacity > MIN_CAPACITY
    table.discard(keys(values[:9990]), 0)
    assert table.capacity == MIN_CAPACITY
    assert lookup(table, values[9990:]) == [1] * 10


def test_bits_past_64_widen_the_masks() -> None:
    table = BlockTable()
    table.store(keys([1, 2]), 0)
    assert table.width == 1
    table.store(keys([2, 3]), 64)
    assert table.width == 2
    table.store(keys([3, 4]), 1000)
    assert table.width == 16
    assert lookup(table, [1, 2, 3, 4, 5]) == [1, 1 | 1 << 64, 1 << 64 | 1 << 1000, 1 << 1000, 0]
    assert table.discard(keys([3]), 64) == 1
    assert lookup(table, [3]) == [1 << 1000]
    assert (table.count_bit(0), table.count_bit(64), table.count_bit(1000)) == (2, 1, 2)


def test_clear_bit_removes_the_bit_everywhere_and_drops_emptied_entries() -> None:
    table = BlockTable()
    table.store(keys(COLLIDING[:30]), 2)
    table.store(keys(COLLIDING[20:40]), 700)
    table.clear_bit(2)
    assert len(table) == 20
    assert lookup(table, COLLIDING[:40]) == [0] * 20 + [1 << 700] * 20
    table.clear_bit(700)
    assert len(table) == 0
    assert table.capacity == MIN_CAPACITY
    table.store(keys([COLLIDING[0]]), 5)
    assert lookup(table, COLLIDING[:2]) == [32, 0]


def test_holding_reports_which_keys_have_the_bit() -> None:
    table = BlockTable()
    table.store(keys([1, 2]), 0)
    table.store(keys([2]), 70)
    assert table.holding(keys([1, 2, 3]), 70).tolist() == [False, True, False]
    assert table.holding(keys([1, 2, 3]), 200).tolist() == [False, False, False]


def test_prefix_and_runs_until_nobody_holds_the_prefix() -> None:
    confirmed, predicted = BlockTable(), BlockTable()
    confirmed.store(keys([1, 2, 3]), 0)
    confirmed.store(keys([1, 2]), 1)
    predicted.store(keys([3, 4]), 1)
    all_bits = np.full(1, np.uint64(2**64 - 1))
    out = np.empty((5, 1), np.uint64)
    assert confirmed.prefix_and(keys([1, 2, 3, 4, 5]), None, all_bits, out, True) == 3
    assert mask_ints(out[:3]) == [3, 3, 1]
    assert confirmed.prefix_and(keys([1, 2, 3, 4, 5]), predicted, all_bits, out, True) == 4
    assert mask_ints(out[:4]) == [3, 3, 3, 2]
    # A second group ANDs into the rows of the first; `alive` carries a prefix.
    other = BlockTable()
    other.store(keys([1, 2, 3, 4]), 1)
    assert other.prefix_and(keys([1, 2, 3, 4]), None, all_bits, out, False) == 4
    assert mask_ints(out[:4]) == [2, 2, 2, 2]
    assert confirmed.prefix_and(keys([3]), None, np.full(1, np.uint64(2)), out, True) == 0


def test_mask_ints_converts_only_the_words_in_use() -> None:
    words = np.array([[0, 5, 0], [0, 1, 2], [0, 0, 0]], np.uint64)
    assert mask_ints(words) == [5 << 64, 1 << 64 | 2 << 128, 0]
    assert mask_ints(words[:, :2]) == [5 << 64, 1 << 64, 0]
    assert mask_ints(np.zeros((2, 4), np.uint64)) == [0, 0]
    assert mask_ints(np.array([[3], [2**63]], np.uint64)) == [3, 2**63]
    # Rows that are subsets of a span row (a prefix scan) convert by its words.
    scan = np.array([[0, 7, 4, 0], [0, 3, 0, 0], [0, 1, 0, 0]], np.uint64)
    assert mask_ints(scan, span_row=scan[0]) == [7 << 64 | 4 << 128, 3 << 64, 1 << 64]
    assert mask_ints(scan[1:], span_row=scan[1]) == [3 << 64, 1 << 64]


KEY_POOL = [*COLLIDING[:12], 0, 1, 2, 2**63, 2**64 - 1, 0xDEADBEEF]
BITS = [0, 1, 63, 64, 130, 1000]
operations = st.lists(
    st.tuples(
        st.sampled_from(["store", "discard", "clear"]),
        st.lists(st.sampled_from(KEY_POOL), max_size=12),
        st.sampled_from(BITS),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_operations_match_a_dict_model(ops: list[tuple[str, list[int], int]]) -> None:
    table = BlockTable()
    model: dict[int, int] = {}
    for op, values, bit in ops:
        flag = 1 << bit
        if op == "store":
            held = []
            for key in values:
                if model.get(key, 0) & flag:
                    held.append(key)
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
        assert table.count_bit(bit) == sum(1 for mask in model.values() if mask & flag)
