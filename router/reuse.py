"""Which prompt prefixes the cluster has seen recently: the router's eviction hint.

Most blocks of a real trace are used once. A replica can only tell a reused
block from a one-off by hitting on it, and forgets both once evicted; the
router sees every prompt, so it can remember prefixes no replica still holds.
Each routed prompt carries `reuse_hint_tokens`, the length of its leading
blocks seen before, and replicas running segmented LRU protect those blocks.

Memory is bounded by two generations of block hashes: a prefix counts as seen
while it is in either, so it is remembered for between `capacity / 2` and
`capacity` newer blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvroute.replicas.kv_cache.utils import BlockHash


class ReuseTracker:
    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        if capacity_blocks < 2:
            raise ValueError(f"capacity_blocks must be at least 2, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._current: set[BlockHash] = set()
        self._previous: set[BlockHash] = set()

    @classmethod
    def for_cluster(
        cls, memory: float, cluster_blocks: int, block_size: int
    ) -> ReuseTracker | None:
        """A tracker remembering `memory` times the cluster's KV blocks; None for 0."""
        if memory <= 0:
            return None
        return cls(max(2, int(memory * cluster_blocks)), block_size)

    def observe(self, block_hashes: Sequence[BlockHash]) -> int:
        """Record a prompt's block hashes (at `block_size`); return how many of its
        leading tokens were seen in earlier prompts."""
        current, previous = self._current, self._previous
        seen = 0
        for block_hash in block_hashes:
            if block_hash not in current and block_hash not in previous:
                break
            seen += 1
        current.update(block_hashes)
        if len(current) >= self.capacity_blocks // 2:
            self._previous, self._current = current, set()
        return seen * self.block_size

    def __len__(self) -> int:
        return len(self._current | self._previous)
