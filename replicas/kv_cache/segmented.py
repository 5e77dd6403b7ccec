"""Segmented-LRU eviction (SLRU): an opt-in alternative to the plain LRU free queue.

Three in four blocks of a real chat trace are used once and never again, yet
plain LRU keeps them as long as blocks that every later turn re-reads. SLRU
splits the free queue in two, inside one linked list:

    head -> [probation ... ] MID [ ... protected] <- tail

- A block earns protection by being reused: a cache hit on it, or a router
  hint that its prefix was already seen elsewhere in the cluster (the router
  sees every prompt, so it remembers blocks no single replica still holds).
- Freed blocks go to the MRU end of their segment; eviction takes probation
  first, deepest block first, exactly as LRU orders a single request's blocks.
- Whenever blocks are freed, protected free blocks are capped at
  `1 - probation_fraction` of the free queue; the overflow (protected LRU
  end) is demoted to probation's MRU end.

Unlinking is segment-agnostic (both segments are one list), so a hit pulling a
block out of the middle stays O(1). With this module unused, the block pool is
exactly vLLM's LRU (the seed's eviction-order tests run against that).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvroute.replicas.kv_cache.block_pool import BlockPool
from kvroute.replicas.kv_cache.utils import FreeKVCacheBlockQueue, KVCacheBlock
from kvroute.replicas.request import Request


class SegmentedFreeBlockQueue(FreeKVCacheBlockQueue):
    """The free list with a probation and a protected segment, split by a sentinel.

    `block.reused` is True exactly for the free blocks in the protected segment
    (and, for blocks in use, marks them for protection when they are freed).
    """

    def __init__(self, blocks: list[KVCacheBlock], probation_fraction: float) -> None:
        if not 0.0 < probation_fraction < 1.0:
            raise ValueError(f"probation_fraction must be in (0, 1), got {probation_fraction}")
        for block in blocks:
            block.reused = False
        super().__init__(blocks)
        self.probation_fraction = probation_fraction
        self.num_protected = 0
        self.mid = KVCacheBlock(block_id=-1)
        self._link_before(self.fake_free_list_tail, self.mid)

    @staticmethod
    def _link_before(anchor: KVCacheBlock, block: KVCacheBlock) -> None:
        prev_block = anchor.prev_free_block
        assert prev_block is not None
        prev_block.next_free_block = block
        block.prev_free_block = prev_block
        block.next_free_block = anchor
        anchor.prev_free_block = block

    def popleft(self) -> KVCacheBlock:
        if self.num_free_blocks == 0:
            raise ValueError("No free blocks available")
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Probation first, then protected; the sentinel stays in the list."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot pop {n} blocks: only {self.num_free_blocks} are free")
        taken: list[KVCacheBlock] = []
        block = self.fake_free_list_head.next_free_block
        passed_mid = False
        while len(taken) < n:
            assert block is not None
            nxt = block.next_free_block
            if block is self.mid:
                passed_mid = True
            else:
                taken.append(block)
                if block.reused:
                    self.num_protected -= 1
                    block.reused = False
                block.prev_free_block = block.next_free_block = None
            block = nxt
        assert block is not None
        head = self.fake_free_list_head
        head.next_free_block = block
        block.prev_free_block = head
        if passed_mid:
            self._link_before(block, self.mid)
        self.num_free_blocks -= len(taken)
        return taken

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink a free block (a cache hit); it leaves its segment."""
        super().remove(block)
        if block.reused:
            self.num_protected -= 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Each block joins the MRU end of its segment, then protected overflow
        is demoted."""
        mid, tail = self.mid, self.fake_free_list_tail
        count = 0
        for block in blocks:
            if block.reused:
                self._link_before(tail, block)
                self.num_protected += 1
            else:
                self._link_before(mid, block)
            count += 1
        self.num_free_blocks += count
        self._demote_overflow()

    def prepend_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Scratch blocks: the head of probation, next to be reused."""
        blocks = list(blocks)
        for block in blocks:
            block.reused = False
        super().prepend_n(blocks)

    def _demote_overflow(self) -> None:
        # The epsilon keeps e.g. (1 - 0.9) * 10 from truncating to 0.
        limit = int((1.0 - self.probation_fraction) * self.num_free_blocks + 1e-9)
        mid = self.mid
        while self.num_protected > limit:
            block = mid.next_free_block
            assert block is not None and block.reused
            # Moving the sentinel one step right puts `block` at probation's MRU end.
            nxt = block.next_free_block
            assert nxt is not None
            prev_block = mid.prev_free_block
            assert prev_block is not None
            prev_block.next_free_block = block
            block.prev_free_block = prev_block
            block.next_free_block = mid
            mid.prev_free_block = block
            mid.next_free_block = nxt
            nxt.prev_free_block = mid
            block.reused = False
            self.num_protected -= 1

    def unprotect(self, block: KVCacheBlock) -> None:
        """Move a free block to the head: it holds nothing worth keeping."""
        self.remove(block)
        self.prepend_n((block,))

    def unprotect_all(self) -> None:
        """Make every free block probation (the cache was cleared)."""
        for block in self.get_all_free_blocks():
            block.reused = False
        self.num_protected = 0
        tail = self.fake_free_list_tail
        if tail.prev_free_block is not self.mid:
            prev_block, next_block = self.mid.prev_free_block, self.mid.next_free_block
            assert prev_block is not None and next_block is not None
            prev_block.next_free_block = next_block
            next_block.prev_free_block = prev_block
            self._link_before(tail, self.mid)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        return [b for b in super().get_all_free_blocks() if b is not self.mid]


class SegmentedBlockPool(BlockPool):
    """A block pool evicting by SLRU: hits and router-hinted blocks are protected."""

    def __init__(
        self,
        num_gpu_blocks: int,
        enable_caching: bool,
        hash_block_size: int,
        enable_kv_cache_events: bool = False,
        use_int_event_hashes: bool = True,
        *,
        probation_fraction: float,
    ) -> None:
        self.probation_fraction = probation_fraction
        super().__init__(
            num_gpu_blocks,
            enable_caching,
            hash_block_size,
            enable_kv_cache_events=enable_kv_cache_events,
            use_int_event_hashes=use_int_event_hashes,
        )

    def _make_free_queue(self, blocks: list[KVCacheBlock]) -> FreeKVCacheBlockQueue:
        return SegmentedFreeBlockQueue(blocks, self.probation_fraction)

    @property
    def _queue(self) -> SegmentedFreeBlockQueue:
        queue = self.free_block_queue
        assert isinstance(queue, SegmentedFreeBlockQueue)
        return queue

    def reset_prefix_cache(self) -> bool:
        """Forget every hash; the emptied blocks lose their protection too."""
        if not super().reset_prefix_cache():
            return False
        self._queue.unprotect_all()
        return True

    def evict_blocks(self, block_ids: Iterable[int]) -> None:
        """Evict free cached blocks; emptied, they go to the head of the queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0 and self._maybe_evict_cached_block(block):
                self._queue.unprotect(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A hit: take a reference, and mark the block for protection."""
        queue = self.free_block_queue
        for block in blocks:
            if block.is_null:
                continue
            if block.ref_cnt == 0:
                queue.remove(block)
            block.reused = True
            block.ref_cnt += 1

    def cache_full_blocks(
        self,
        request: Request,
        blocks: Sequence[KVCacheBlock],
        num_cached_blocks: int,
        num_full_blocks: int,
        block_size: int,
        kv_cache_group_id: int,
        block_mask: Sequence[bool] | None = None,
    ) -> None:
        """Cache as usual; blocks inside the router's reuse hint are protected."""
        super().cache_full_blocks(
            request,
            blocks,
            num_cached_blocks,
            num_full_blocks,
            block_size,
            kv_cache_group_id,
            block_mask,
        )
        hinted = min(num_full_blocks, request.reuse_hint_tokens // block_size)
        for block in blocks[num_cached_blocks:hinted]:
            if not block.is_null:
                block.reused = True


def make_block_pool(
    num_gpu_blocks: int,
    *,
    enable_caching: bool,
    hash_block_size: int,
    enable_kv_cache_events: bool,
    use_int_event_hashes: bool,
    probation_fraction: float | None,
) -> BlockPool:
    """vLLM's LRU pool, or the segmented-LRU one when a probation fraction is set."""
    if probation_fraction is None or not enable_caching:
        return BlockPool(
            num_gpu_blocks,
            enable_caching,
            hash_block_size,
            enable_kv_cache_events=enable_kv_cache_events,
            use_int_event_hashes=use_int_event_hashes,
        )
    return SegmentedBlockPool(
        num_gpu_blocks,
        enable_caching,
        hash_block_size,
        enable_kv_cache_events=enable_kv_cache_events,
        use_int_event_hashes=use_int_event_hashes,
        probation_fraction=probation_fraction,
    )
