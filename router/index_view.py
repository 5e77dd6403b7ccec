"""A replica's cache as the index knows it, shaped as the block manager's lookup.

`PromptMasks` answers, for one prompt, which replicas hold each of its blocks
(one dict probe per block and group, memoised for the whole prediction);
`ReplicaView` reads one replica's bit out of those masks and presents it as a
`CachedBlockLookup`, so the replica's own `PrefixHitFinder` runs unchanged.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from replicas.kv_cache.coordinator import PrefixHitFinder
from replicas.kv_cache.utils import BlockHash, BlockHashListWithBlockSize, KVCacheBlock

# Stand-ins for physical blocks: the hit rules only count blocks.
HIT = KVCacheBlock(block_id=-1)
NULL = KVCacheBlock(block_id=-1, is_null=True)


def _scale(block_hashes: Sequence[BlockHash]) -> int:
    return block_hashes.scale if isinstance(block_hashes, BlockHashListWithBlockSize) else 1


def _small_hashes(block_hashes: Sequence[BlockHash]) -> tuple[Sequence[BlockHash], int]:
    """The hash-block-size hashes behind a list, and how many make one block.

    A larger block's event key is the low 64 bits of its last small hash, so
    keys can be read without building the concatenated hashes.
    """
    if isinstance(block_hashes, BlockHashListWithBlockSize):
        return block_hashes.block_hashes, block_hashes.scale
    return block_hashes, 1


class PromptMasks:
    """Replica bitmasks per prompt block, confirmed entries or'ed with predictions."""

    __slots__ = ("_extra", "_memo", "_runs", "_tables")

    def __init__(self, tables: list[dict[int, int]], extra: list[dict[int, int]] | None) -> None:
        self._tables = tables
        self._extra = extra
        self._memo: dict[tuple[int, bytes], int] = {}
        # (group ids, scale) -> masks of replicas still holding every block so far
        self._runs: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def mask(self, group: int, block_hash: bytes) -> int:
        memo_key = (group, block_hash)
        mask = self._memo.get(memo_key)
        if mask is None:
            key = int.from_bytes(block_hash[-8:], "big")
            mask = self._tables[group].get(key, 0)
            if self._extra is not None:
                mask |= self._extra[group].get(key, 0)
            self._memo[memo_key] = mask
        return mask

    def all_groups_mask(self, group_ids: Sequence[int], block_hash: bytes) -> int:
        mask = -1
        for group in group_ids:
            mask &= self.mask(group, block_hash)
            if not mask:
                return 0
        return mask

    def alive_runs(
        self, group_ids: Sequence[int], block_hashes: Sequence[BlockHash], max_blocks: int
    ) -> list[int]:
        """`runs[i]`: replicas holding blocks 0..i in every group; computed once
        per prompt in a single left-to-right pass that stops when nobody is left."""
        memo_key = (tuple(group_ids), _scale(block_hashes))
        runs = self._runs.get(memo_key)
        if runs is None:
            runs = []
            self._runs[memo_key] = runs
        limit = min(max_blocks, len(block_hashes))
        alive = runs[-1] if runs else -1
        if len(group_ids) == 1 and self._extra is None:
            # The common case, one prefix-closed group: probe the table
            # directly with each block's event key (no memo, no concatenation).
            get = self._tables[group_ids[0]].get
            small, scale = _small_hashes(block_hashes)
            i = len(runs)
            while i < limit and alive:
                alive &= get(int.from_bytes(small[(i + 1) * scale - 1][-8:], "big"), 0)
                runs.append(alive)
                i += 1
            return runs
        while len(runs) < limit and alive:
            alive &= self.all_groups_mask(group_ids, block_hashes[len(runs)])
            runs.append(alive)
        return runs

    def candidates(
        self, finder: PrefixHitFinder, block_hashes: Sequence[BlockHash], max_length: int
    ) -> int:
        """Replicas whose hit can be non-zero: with a prefix-closed group, those
        holding the first block in it; otherwise any replica holding any block."""
        first = finder.spec_groups[0]
        hashes = finder._hashes_for(first.spec, block_hashes)
        if first.manager_cls.downward_closed:
            runs = self.alive_runs(first.group_ids, hashes, max_length // first.spec.block_size)
            return runs[0] if runs else 0
        found = 0
        for group in finder.spec_groups:
            hashes = finder._hashes_for(group.spec, block_hashes)
            for i in range(min(max_length // group.spec.block_size, len(hashes))):
                for group_id in group.group_ids:
                    found |= self.mask(group_id, hashes[i])
        return found


class ReplicaView:
    """One replica's bit of `PromptMasks`, as a `CachedBlockLookup`."""

    __slots__ = ("_bit", "_masks")

    null_block = NULL

    def __init__(self, masks: PromptMasks, bit: int) -> None:
        self._masks = masks
        self._bit = bit

    def get_cached_block(
        self, block_hash: BlockHash, kv_cache_group_ids: Sequence[int]
    ) -> list[KVCacheBlock] | None:
        if self._masks.all_groups_mask(kv_cache_group_ids, block_hash) >> self._bit & 1:
            return [HIT] * len(kv_cache_group_ids)
        return None

    def get_cached_prefix(
        self, block_hashes: Sequence[BlockHash], max_blocks: int, kv_cache_group_ids: Sequence[int]
    ) -> tuple[list[KVCacheBlock], ...]:
        runs = self._masks.alive_runs(kv_cache_group_ids, block_hashes, max_blocks)
        flag = 1 << self._bit
        # Bits only ever drop out of `runs`, so the run length is a bisection.
        length = bisect_left(runs, True, key=lambda alive: not alive & flag)
        length = min(length, max_blocks)
        return tuple([HIT] * length for _ in kv_cache_group_ids)
