"""A replica's cache as the index knows it, shaped as the block manager's lookup.

`PromptMasks` answers, for one prompt, which replicas hold each of its blocks:
it looks the prompt's event keys up in each group's `BlockTable` with one
compiled call per group (predictions or'ed in) - a prefix scan that stops
where nobody holds the prefix for full-attention groups, the whole prompt for
window and state groups - and keeps the results for the whole prediction.
`ReplicaView` reads one replica's bit out of those masks and presents it as a
`CachedBlockLookup`, so the replica's own `PrefixHitFinder` runs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvroute.replicas.kv_cache.coordinator import PrefixHitFinder
from kvroute.replicas.kv_cache.utils import BlockHash, KVCacheBlock
from kvroute.router.index.block_table import BlockTable, mask_ints
from kvroute.router.index.prefix_scan import run_ends

# Stand-ins for physical blocks: the hit rules only count blocks.
HIT = KVCacheBlock(block_id=-1)
NULL = KVCacheBlock(block_id=-1, is_null=True)
# `alive` before the first block: every replica.
EVERYONE = np.empty(0, np.uint64)


class _Run:
    """A prefix scan in progress over `length` blocks, all of them held by
    someone: `first` is the mask of replicas holding block 0 in every group,
    `ends[bit]` the run length of each replica of `first` whose run ended
    within them (the others' runs reach `length` at least); `alive` is the last
    row as words, None once nobody is left (then every run ended)."""

    __slots__ = ("alive", "ends", "first", "length")

    def __init__(self) -> None:
        self.length = 0
        self.first = 0
        self.ends: dict[int, int] = {}
        self.alive: np.ndarray | None = EVERYONE

    def run_length(self, bit: int) -> int:
        """Leading blocks `bit` holds in every group, up to `length`."""
        if not self.first >> bit & 1:
            return 0
        return self.ends.get(bit, self.length)

    def extend(self, rows: np.ndarray, live: int) -> None:
        """Append the scan's next rows (`live` of them non-zero, then one zero row
        unless the scan ran to the end of its keys), noting where each run ends."""
        start = self.length
        if start == 0 and live:
            self.first = int.from_bytes(rows[0].astype("<u8", copy=False).tobytes(), "little")
        previous = EVERYONE if start == 0 else self.alive
        assert previous is not None  # a scan nobody is left in is not extended
        bits, ends = run_ends(rows, live, previous, start)
        self.ends.update(zip(bits.tolist(), ends.tolist(), strict=True))
        self.length = start + live
        self.alive = rows[live - 1].copy() if live == rows.shape[0] else None


class PromptMasks:
    """Replica bitmasks per prompt block, confirmed entries or'ed with predictions.

    `small_keys` are the event keys of the prompt's hash-block-size hashes;
    `scales[g]` is how many of them make one block of group g, whose event key
    is that of its last small hash.
    """

    __slots__ = (
        "_all",
        "_by_key",
        "_extra",
        "_keys",
        "_runs",
        "_scales",
        "_small",
        "_tables",
        "_width",
    )

    def __init__(
        self,
        tables: list[BlockTable],
        extra: list[BlockTable] | None,
        small_keys: np.ndarray,
        scales: Sequence[int],
    ) -> None:
        self._tables = tables
        self._extra = extra
        self._small = small_keys
        self._scales = scales
        self._keys: dict[int, np.ndarray] = {}
        self._all: dict[int, np.ndarray] = {}
        self._by_key: dict[int, dict[int, int]] = {}
        self._runs: dict[tuple[int, ...], _Run] = {}
        # One word count for every group, so masks of different groups combine.
        self._width = max(table.width for table in (*tables, *(extra or ())))

    def _group_keys(self, group: int) -> np.ndarray:
        scale = self._scales[group]
        keys = self._keys.get(scale)
        if keys is None:
            keys = np.ascontiguousarray(self._small[scale - 1 :: scale])
            self._keys[scale] = keys
        return keys

    def _all_blocks(self, group: int) -> np.ndarray:
        masks = self._all.get(group)
        if masks is None:
            keys = self._group_keys(group)
            masks = np.zeros((keys.size, self._width), np.uint64)
            self._tables[group].lookup_into(keys, masks)
            if self._extra is not None:
                self._extra[group].lookup_into(keys, masks)
            self._all[group] = masks
        return masks

    def mask(self, group: int, block_hash: bytes) -> int:
        by_key = self._by_key.get(group)
        if by_key is None:
            masks = self._all_blocks(group)
            held = np.flatnonzero(masks.any(axis=1))
            keys = self._group_keys(group)[held].tolist()
            by_key = dict(zip(keys, mask_ints(masks[held]), strict=True))
            self._by_key[group] = by_key
        return by_key.get(int.from_bytes(block_hash[-8:], "big"), 0)

    def all_groups_mask(self, group_ids: Sequence[int], block_hash: bytes) -> int:
        mask = -1
        for group in group_ids:
            mask &= self.mask(group, block_hash)
            if not mask:
                return 0
        return mask

    def prefix_run(self, group_ids: Sequence[int], max_blocks: int) -> _Run:
        """The scan of blocks held in every group of `group_ids`, over at least
        `max_blocks` blocks unless nobody is left or the prompt ends (it may run
        further). One compiled scan per group, which stops where nobody is left;
        memoised per prompt and extended if a later call asks for more."""
        memo_key = tuple(group_ids)
        run = self._runs.get(memo_key)
        if run is None:
            run = self._runs[memo_key] = _Run()
        keys = self._group_keys(group_ids[0])
        limit = min(max_blocks, len(keys))
        if run.length < limit and run.alive is not None:
            keys = keys[run.length : limit]
            out = np.empty((keys.size, self._width), np.uint64)
            live = keys.size
            extra = self._extra
            for i, group in enumerate(group_ids):
                live = self._tables[group].prefix_and(
                    keys[:live], None if extra is None else extra[group], run.alive, out, i == 0
                )
            run.extend(out, live)
        return run

    def candidates(self, finder: PrefixHitFinder, max_length: int) -> int:
        """Replicas whose hit can be non-zero: with a prefix-closed group, those
        holding the first block in it; otherwise any replica holding any block."""
        first = finder.spec_groups[0]
        if first.manager_cls.downward_closed:
            return self.prefix_run(first.group_ids, max_length // first.spec.block_size).first
        found = np.zeros((1, self._width), np.uint64)
        for group in finder.spec_groups:
            limit = max_length // group.spec.block_size
            for group_id in group.group_ids:
                found |= np.bitwise_or.reduce(self._all_blocks(group_id)[:limit], axis=0)
        return mask_ints(found)[0]


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
        del block_hashes  # the masks are keyed by the prompt already
        run = self._masks.prefix_run(kv_cache_group_ids, max_blocks)
        length = min(run.run_length(self._bit), max_blocks)
        return tuple([HIT] * length for _ in kv_cache_group_ids)
