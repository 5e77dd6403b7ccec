"""The block pool's free queue, cache map, eviction events and reset rules."""

from __future__ import annotations

import pytest

from kvroute.events.hashing import sha256
from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from kvroute.replicas.kv_cache.block_pool import BlockPool
from kvroute.replicas.kv_cache.utils import (
    FreeKVCacheBlockQueue,
    KVCacheBlock,
    get_request_block_hasher,
    init_none_hash,
    maybe_convert_block_hash,
)
from kvroute.replicas.request import LoRARequest, Request, SamplingParams


@pytest.fixture(autouse=True)
def _seeded_none_hash() -> None:
    init_none_hash(sha256, seed="0")


def _ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def _request(tokens: list[int], block_size: int, **kwargs) -> Request:
    return Request(
        "r",
        tokens,
        SamplingParams(max_tokens=1),
        block_hasher=get_request_block_hasher(block_size, sha256),
        **kwargs,
    )


def test_free_queue_pops_from_head_and_appends_at_tail() -> None:
    blocks = [KVCacheBlock(i) for i in range(6)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert queue.popleft().block_id == 0
    assert _ids(queue.popleft_n(2)) == [1, 2]
    queue.remove(blocks[4])
    queue.append_n([blocks[1], blocks[4]])
    queue.append(blocks[0])
    assert _ids(queue.get_all_free_blocks()) == [3, 5, 1, 4, 0]
    assert queue.num_free_blocks == 5
    assert queue.popleft_n(0) == []


def test_free_queue_refuses_impossible_operations() -> None:
    blocks = [KVCacheBlock(i) for i in range(2)]
    queue = FreeKVCacheBlockQueue(blocks)
    with pytest.raises(ValueError, match="cannot pop 3 blocks: only 2 are free"):
        queue.popleft_n(3)
    taken = queue.popleft()
    with pytest.raises(RuntimeError, match="not free"):
        queue.remove(taken)
    queue.popleft()
    with pytest.raises(ValueError, match=r"^No free blocks available$"):
        queue.popleft()


def test_block_hash_cannot_be_overwritten_without_reset() -> None:
    block = KVCacheBlock(1)
    block.block_hash = b"a" * 8  # type: ignore[assignment]
    with pytest.raises(ValueError, match="already has a hash"):
        block.block_hash = b"b" * 8  # type: ignore[assignment]
    block.reset_hash()
    assert block.block_hash is None


def test_null_block_is_block_zero_and_never_joins_the_free_queue() -> None:
    pool = BlockPool(num_gpu_blocks=4, enable_caching=True, hash_block_size=4)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    assert pool.get_num_free_blocks() == 3
    pool.touch([pool.null_block])
    pool.free_blocks([pool.null_block])
    assert _ids(pool.free_block_queue.get_all_free_blocks()) == [1, 2, 3]


def test_stored_event_carries_lora_tokens_and_parent() -> None:
    pool = BlockPool(8, enable_caching=True, hash_block_size=4, enable_kv_cache_events=True)
    request = _request(list(range(12)), 4, lora_request=LoRARequest("ad", 7))
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(request, blocks, 0, 1, 4, 0)
    pool.cache_full_blocks(request, blocks, 1, 3, 4, 2)
    first, second = pool.take_events()
    assert isinstance(first, BlockStored) and isinstance(second, BlockStored)
    assert first.parent_block_hash is None
    assert first.token_ids == [0, 1, 2, 3]
    assert (first.lora_id, first.lora_name, first.group_idx) == (7, "ad", 0)
    assert second.parent_block_hash == maybe_convert_block_hash(request.block_hashes[0])
    assert second.block_hashes == [maybe_convert_block_hash(h) for h in request.block_hashes[1:]]
    assert second.token_ids == list(range(4, 12))
    assert second.group_idx == 2
    assert pool.take_events() == []


def test_raw_byte_event_hashes_when_int_hashes_are_off() -> None:
    pool = BlockPool(
        4,
        enable_caching=True,
        hash_block_size=4,
        enable_kv_cache_events=True,
        use_int_event_hashes=False,
    )
    request = _request(list(range(4)), 4)
    pool.cache_full_blocks(request, pool.get_new_blocks(1), 0, 1, 4, 0)
    (event,) = pool.take_events()
    assert event.block_hashes == [request.block_hashes[0]]


def test_eviction_under_pressure_emits_one_removal_per_cached_block() -> None:
    pool = BlockPool(5, enable_caching=True, hash_block_size=4, enable_kv_cache_events=True)
    request = _request(list(range(16)), 4)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(request, blocks, 0, 4, 4, 1)
    pool.take_events()
    pool.free_blocks(reversed(blocks))
    assert _ids(pool.free_block_queue.get_all_free_blocks()) == [4, 3, 2, 1]
    assert _ids(pool.get_new_blocks(2)) == [4, 3]
    removed = pool.take_events()
    expected = [maybe_convert_block_hash(h) for h in request.block_hashes[3:1:-1]]
    assert removed == [
        BlockRemoved(block_hashes=[expected[0]], medium="GPU", group_idx=1),
        BlockRemoved(block_hashes=[expected[1]], medium="GPU", group_idx=1),
    ]
    assert len(pool.cached_block_hash_to_block) == 2
    assert pool.get_cached_block(request.block_hashes[0], [1]) == [pool.blocks[1]]
    assert pool.get_cached_block(request.block_hashes[3], [1]) is None


def test_get_new_blocks_beyond_free_count_is_an_error() -> None:
    pool = BlockPool(3, enable_caching=True, hash_block_size=4)
    with pytest.raises(ValueError, match=r"^Cannot get 3 free blocks from the pool$"):
        pool.get_new_blocks(3)


def test_reset_prefix_cache_refused_while_blocks_are_in_use() -> None:
    pool = BlockPool(4, enable_caching=True, hash_block_size=4, enable_kv_cache_events=True)
    request = _request(list(range(4)), 4)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(request, blocks, 0, 1, 4, 0)
    pool.take_events()
    assert pool.get_usage() == pytest.approx(1 / 3)
    assert not pool.reset_prefix_cache()
    assert pool.take_events() == []
    assert len(pool.cached_block_hash_to_block) == 1
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]
    assert blocks[0].block_hash is None and not pool.cached_block_hash_to_block


def test_evict_blocks_skips_blocks_in_use() -> None:
    pool = BlockPool(4, enable_caching=True, hash_block_size=4)
    request = _request(list(range(8)), 4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(request, blocks, 0, 2, 4, 0)
    pool.free_blocks(blocks[1:])
    pool.evict_blocks([1, 2])
    assert pool.get_cached_block(request.block_hashes[0], [0]) == [blocks[0]]
    assert pool.get_cached_block(request.block_hashes[1], [0]) is None
