"""Segmented-LRU eviction: reused blocks outlive one-off blocks, hints protect."""

from __future__ import annotations

import pytest

from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.segmented import SegmentedFreeBlockQueue
from kvroute.replicas.kv_cache.utils import KVCacheBlock
from kvroute.replicas.request import Request
from tests.replicas.conftest import full, manager, request


def _empty_queue(
    num_blocks: int, probation_fraction: float
) -> tuple[SegmentedFreeBlockQueue, list[KVCacheBlock]]:
    blocks = [KVCacheBlock(i) for i in range(num_blocks)]
    queue = SegmentedFreeBlockQueue(blocks, probation_fraction)
    queue.popleft_n(num_blocks)
    return queue, blocks


def _ids(queue: SegmentedFreeBlockQueue) -> list[int]:
    return [b.block_id for b in queue.get_all_free_blocks()]


def _free(queue: SegmentedFreeBlockQueue, blocks: list, reused: set[int]) -> None:
    for block in blocks:
        block.reused = block.block_id in reused
    queue.append_n(blocks)


def _serve(mgr: KVCacheManager, request_id: str, tokens: list[int], hint: int = 0) -> list[int]:
    """Prefill a request in one step, free it, and return its block ids."""
    req = request(request_id, tokens, 4, reuse_hint_tokens=hint)
    hit_blocks, hit = mgr.get_computed_blocks(req)
    mgr.allocate_slots(req, len(tokens) - hit, hit, hit_blocks)
    req.num_computed_tokens = len(tokens)
    ids = mgr.get_block_ids(request_id)[0]
    mgr.free(req)
    return ids


def test_one_off_blocks_are_evicted_before_reused_ones_even_when_newer() -> None:
    queue, b = _empty_queue(6, 0.5)
    _free(queue, [b[1], b[2], b[3], b[4]], reused={1, 2})
    assert _ids(queue) == [3, 4, 1, 2]
    assert queue.num_free_blocks == 4 and queue.num_protected == 2
    assert [x.block_id for x in queue.popleft_n(3)] == [3, 4, 1]
    assert queue.num_free_blocks == 1 and queue.num_protected == 1


def test_protected_overflow_is_demoted_to_the_mru_end_of_probation() -> None:
    queue, b = _empty_queue(6, 0.5)
    _free(queue, [b[1], b[2], b[3], b[4]], reused={1, 2, 3})
    # 4 free blocks allow 2 protected: the oldest protected one, b1, is demoted.
    assert _ids(queue) == [4, 1, 2, 3]
    assert [x.reused for x in queue.get_all_free_blocks()] == [False, False, True, True]
    assert queue.num_protected == 2


def test_eviction_runs_past_the_sentinel_when_probation_is_empty() -> None:
    queue, b = _empty_queue(6, 0.25)
    _free(queue, [b[1], b[2]], reused={1, 2})
    assert _ids(queue) == [1, 2] and queue.num_protected == 1
    assert [x.block_id for x in queue.popleft_n(2)] == [1, 2]
    assert queue.num_free_blocks == 0 and queue.num_protected == 0
    assert not b[1].reused and not b[2].reused
    _free(queue, [b[3]], reused=set())
    _free(queue, [b[4]], reused={4})
    assert _ids(queue) == [3, 4]
    assert queue.popleft().block_id == 3


def test_a_hit_on_a_protected_block_takes_it_out_of_the_count() -> None:
    queue, b = _empty_queue(6, 0.5)
    _free(queue, [b[1], b[2]], reused={2})
    queue.remove(b[2])
    assert _ids(queue) == [1] and queue.num_protected == 0 and queue.num_free_blocks == 1


def test_scratch_blocks_go_to_the_head_unprotected() -> None:
    queue, b = _empty_queue(6, 0.5)
    _free(queue, [b[1], b[2]], reused={2})
    b[5].reused = True
    queue.prepend_n([b[5]])
    assert _ids(queue) == [5, 1, 2] and not b[5].reused and queue.num_protected == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_probation_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="probation_fraction"):
        SegmentedFreeBlockQueue([KVCacheBlock(0)], fraction)


def test_the_protected_cap_does_not_lose_a_block_to_float_rounding() -> None:
    queue, b = _empty_queue(12, 0.9)
    _free(queue, b[:10], reused={0, 1})
    # (1 - 0.9) * 10 is 0.9999999999999998: one protected block must still fit.
    assert queue.num_protected == 1
    assert _ids(queue) == [2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_a_prefix_cache_reset_leaves_no_empty_block_protected() -> None:
    mgr = manager(12, full(4), probation_fraction=0.5)
    _serve(mgr, "a", list(range(9)), hint=8)
    assert mgr.block_pool.free_block_queue.num_protected == 2
    assert mgr.reset_prefix_cache()
    queue = mgr.block_pool.free_block_queue
    assert queue.num_protected == 0
    assert not any(b.reused for b in queue.get_all_free_blocks())
    # The sentinel is at the tail again: a fresh unhinted request's blocks,
    # freed, are evicted after every empty block.
    ids = _serve(mgr, "b", list(range(100, 109)))
    assert [b.block_id for b in queue.get_all_free_blocks()][-3:] == ids[::-1]


def test_an_evicted_free_block_moves_to_the_head_unprotected() -> None:
    mgr = manager(12, full(4), probation_fraction=0.5)
    ids = _serve(mgr, "a", list(range(9)), hint=8)
    mgr.block_pool.evict_blocks([ids[1]])
    queue = mgr.block_pool.free_block_queue
    assert queue.get_all_free_blocks()[0].block_id == ids[1]
    assert queue.num_protected == 1 and not mgr.block_pool.blocks[ids[1]].reused


def test_a_negative_reuse_hint_is_refused() -> None:
    with pytest.raises(ValueError, match="reuse_hint_tokens"):
        request("a", [1, 2, 3], 4, reuse_hint_tokens=-4)


def test_router_hint_protects_blocks_on_their_first_use() -> None:
    mgr = manager(20, full(4), probation_fraction=0.5)
    ids = _serve(mgr, "a", list(range(17)), hint=8)
    pool = mgr.block_pool
    protected = [i for i in ids if pool.blocks[i].reused]
    assert protected == ids[:2]
    # Free order is deepest first within each segment; the hinted prefix is last.
    assert [b.block_id for b in pool.free_block_queue.get_all_free_blocks()][-2:] == [
        ids[1],
        ids[0],
    ]


def test_a_cache_hit_protects_the_blocks_it_reused() -> None:
    mgr = manager(20, full(4), probation_fraction=0.5)
    ids = _serve(mgr, "a", list(range(17)))
    assert not any(mgr.block_pool.blocks[i].reused for i in ids)
    second = request("b", [*range(13), 99, 98], 4)
    hit_blocks, hit = mgr.get_computed_blocks(second)
    assert hit == 12
    mgr.allocate_slots(second, 15 - hit, hit, hit_blocks)
    assert [mgr.block_pool.blocks[i].reused for i in ids] == [True, True, True, False, False]


def test_lru_pool_ignores_hints() -> None:
    mgr = manager(20, full(4))
    ids = _serve(mgr, "a", list(range(17)), hint=16)
    free = [b.block_id for b in mgr.block_pool.free_block_queue.get_all_free_blocks()]
    assert free[-5:] == ids[::-1]
    assert not any(mgr.block_pool.blocks[i].reused for i in ids)


def _start(mgr: KVCacheManager, request_id: str, tokens: list[int]) -> tuple[Request, int]:
    """Prefill a request in one step and keep it running; returns it and its hit."""
    req = request(request_id, tokens, 4)
    hit_blocks, hit = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, len(tokens) - hit, hit, hit_blocks) is not None
    req.num_computed_tokens = len(tokens)
    return req, hit


def test_a_hit_on_blocks_another_running_request_holds_protects_them() -> None:
    # The commonest hit under load: the blocks are still in use, not in the free queue.
    mgr = manager(20, full(4), probation_fraction=0.5)
    pool = mgr.block_pool
    first, _ = _start(mgr, "a", list(range(17)))
    ids = mgr.get_block_ids("a")[0]
    assert [pool.blocks[i].ref_cnt for i in ids] == [1, 1, 1, 1, 1]
    second, hit = _start(mgr, "b", [*range(13), 99, 98])
    assert hit == 12
    assert [pool.blocks[i].ref_cnt for i in ids] == [2, 2, 2, 1, 1]
    assert [pool.blocks[i].reused for i in ids] == [True, True, True, False, False]
    mgr.free(first)
    mgr.free(second)
    assert pool.free_block_queue.num_protected == 3
    # A newer one-off request, then one that needs every probation block: LRU
    # would evict the shared prefix (older than the newer one-off blocks),
    # segmented LRU keeps it.
    _serve(mgr, "c", [200 + t for t in range(8)])
    big, _ = _start(mgr, "d", [300 + t for t in range(61)])
    assert len(mgr.get_block_ids("d")[0]) == 16
    mgr.free(big)
    _, again = _start(mgr, "e", [*range(13), 77])
    assert again == 12
