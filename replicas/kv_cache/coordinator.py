"""Coordinators: one block manager per KV cache group, one hit for all of them.

A prefix hit must be usable by every group at once, so its length is the
largest length each group's own rules accept. `PrefixHitFinder` holds those
rules for a config and runs them against any `CachedBlockLookup`: the
coordinators run it on their block pool, and the router runs the very same
code on its index view of a replica, which is how its predictions stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import lcm
from typing import Any

from kvroute.replicas.kv_cache.segmented import make_block_pool
from kvroute.replicas.kv_cache.single_type import (
    CachedBlockLookup,
    SingleTypeKVCacheManager,
    manager_class_for,
)
from kvroute.replicas.kv_cache.specs import KVCacheConfig, KVCacheSpec, SlidingWindowSpec
from kvroute.replicas.kv_cache.utils import BlockHash, BlockHashListWithBlockSize, KVCacheBlock
from kvroute.replicas.request import Request

HitBlocks = tuple[list[KVCacheBlock], ...]


def default_scheduler_block_size(kv_cache_config: KVCacheConfig) -> int:
    """The scheduling granularity: the lcm of every group's block size."""
    return lcm(*(g.kv_cache_spec.block_size for g in kv_cache_config.kv_cache_groups))


def eagle_group_ids(kv_cache_config: KVCacheConfig, use_eagle: bool) -> frozenset[int]:
    """Groups that drop the EAGLE lookahead block: the flagged ones, or all of
    them when EAGLE is on and no group is flagged."""
    flagged = {i for i, g in enumerate(kv_cache_config.kv_cache_groups) if g.is_eagle_group}
    if use_eagle and not flagged:
        flagged = set(range(len(kv_cache_config.kv_cache_groups)))
    return frozenset(flagged)


def validate_retention_interval(
    interval: int | None, scheduler_block_size: int, kv_cache_config: KVCacheConfig
) -> None:
    """Retention thins sliding-window checkpoints; it must land on hit boundaries."""
    if interval is None:
        return
    if not any(
        isinstance(g.kv_cache_spec, SlidingWindowSpec) for g in kv_cache_config.kv_cache_groups
    ):
        raise ValueError(
            "prefix cache retention interval is set, but the model has no sliding-window "
            "group, so it would have no effect; unset it"
        )
    if interval < 0:
        raise ValueError(f"prefix cache retention interval ({interval}) must be non-negative")
    if interval % scheduler_block_size:
        raise ValueError(
            f"prefix cache retention interval ({interval}) must be a multiple of "
            f"scheduler_block_size ({scheduler_block_size})"
        )


@dataclass
class SpecGroup:
    """Groups with an identical spec, looked up together in one pass."""

    spec: KVCacheSpec
    group_ids: list[int]
    manager_cls: type[SingleTypeKVCacheManager]
    use_eagle: bool


class PrefixHitFinder:
    """The longest-prefix-hit rules of one KV cache config.

    Invariants of the result: its length is a multiple of the scheduler block
    size (hybrid) or block size (one group), at most `max_cache_hit_length`,
    and every group holds exactly `length // block_size` blocks of it.
    """

    def __init__(
        self,
        kv_cache_config: KVCacheConfig,
        hash_block_size: int,
        scheduler_block_size: int,
        eagle_groups: frozenset[int],
    ) -> None:
        self.hash_block_size = hash_block_size
        self.scheduler_block_size = scheduler_block_size
        self.num_groups = len(kv_cache_config.kv_cache_groups)
        self.spec_groups: list[SpecGroup] = []
        for i, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            for existing in self.spec_groups:
                if existing.spec == spec:
                    existing.group_ids.append(i)
                    existing.use_eagle = existing.use_eagle or i in eagle_groups
                    break
            else:
                self.spec_groups.append(
                    SpecGroup(spec, [i], manager_class_for(spec), i in eagle_groups)
                )
        # Prefix-closed groups first: their cheap left-to-right scan gives the
        # tightest first bound for the window and state groups after them.
        self.spec_groups.sort(key=lambda g: not g.manager_cls.downward_closed)
        self.unitary = self.num_groups == 1

    def _hashes_for(
        self, spec: KVCacheSpec, block_hashes: Sequence[BlockHash]
    ) -> Sequence[BlockHash]:
        if spec.block_size == self.hash_block_size:
            return block_hashes
        return BlockHashListWithBlockSize(block_hashes, self.hash_block_size, spec.block_size)

    def find_longest_cache_hit(
        self,
        lookup: CachedBlockLookup,
        block_hashes: Sequence[BlockHash],
        max_cache_hit_length: int,
    ) -> tuple[HitBlocks, int]:
        if self.unitary:
            group = self.spec_groups[0]
            blocks = group.manager_cls.find_longest_cache_hit(
                block_hashes,
                max_cache_hit_length,
                group.group_ids,
                lookup,
                group.spec,
                group.use_eagle,
                group.spec.block_size,
            )
            return blocks, len(blocks[0]) * group.spec.block_size
        return self._find_hybrid(lookup, block_hashes, max_cache_hit_length)

    def _find_hybrid(
        self,
        lookup: CachedBlockLookup,
        block_hashes: Sequence[BlockHash],
        max_cache_hit_length: int,
    ) -> tuple[HitBlocks, int]:
        """Fixed point over groups: each group accepts the candidate length or
        shortens it; any shortening restarts the round. Lengths only decrease,
        so this ends. An EAGLE group matches one block past the candidate and
        drops it, once per candidate length."""
        hit_length = max_cache_hit_length
        by_group: list[list[KVCacheBlock] | None] = [None] * self.num_groups
        simple = len(self.spec_groups) == 2 and self.spec_groups[0].manager_cls.downward_closed
        eagle_verified: set[int] = set()
        while True:
            length = hit_length
            for idx, group in enumerate(self.spec_groups):
                spec = group.spec
                if group.manager_cls.downward_closed and by_group[group.group_ids[0]] is not None:
                    length = length // spec.block_size * spec.block_size
                    continue
                drop_eagle = (
                    group.use_eagle
                    and group.manager_cls.drops_eagle_block
                    and idx not in eagle_verified
                )
                max_length = (
                    min(length + spec.block_size, max_cache_hit_length) if drop_eagle else length
                )
                hit = group.manager_cls.find_longest_cache_hit(
                    self._hashes_for(spec, block_hashes),
                    max_length,
                    group.group_ids,
                    lookup,
                    spec,
                    drop_eagle,
                    self.scheduler_block_size,
                )
                new_length = len(hit[0]) * spec.block_size
                if drop_eagle:
                    eagle_verified.add(idx)
                elif new_length < length:
                    eagle_verified.clear()
                length = new_length
                for group_id, blocks in zip(group.group_ids, hit, strict=True):
                    by_group[group_id] = blocks
            if length >= hit_length:
                break
            hit_length = length
            if simple:
                break
        first = self.spec_groups[0]
        if first.manager_cls.downward_closed:
            keep = hit_length // first.spec.block_size
            for group_id in first.group_ids:
                blocks = by_group[group_id]
                if blocks is not None:
                    del blocks[keep:]
        return tuple(b if b is not None else [] for b in by_group), hit_length


class KVCacheCoordinator:
    """Runs the per-group managers over one shared block pool."""

    def __init__(self, kv_cache_config: KVCacheConfig, options: CacheOptions) -> None:
        self.kv_cache_config = kv_cache_config
        self.options = options
        self.max_model_len = options.max_model_len
        self.enable_caching = options.enable_caching
        self.hash_block_size = hash_block_size = options.hash_block_size
        self.scheduler_block_size = scheduler_block_size = options.scheduler_block_size
        self.block_pool = make_block_pool(
            kv_cache_config.num_blocks,
            enable_caching=options.enable_caching,
            hash_block_size=hash_block_size,
            enable_kv_cache_events=options.enable_kv_cache_events,
            use_int_event_hashes=options.use_int_event_hashes,
            probation_fraction=options.probation_fraction,
        )
        self.eagle_group_ids = eagle_group_ids(kv_cache_config, options.use_eagle)
        managers: list[SingleTypeKVCacheManager] = []
        for i, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            manager = manager_class_for(spec)(
                spec,
                block_pool=self.block_pool,
                enable_caching=options.enable_caching,
                kv_cache_group_id=i,
                scheduler_block_size=scheduler_block_size,
                max_admission_blocks_per_request=spec.max_admission_blocks_per_request(
                    options.max_num_batched_tokens, options.max_model_len
                ),
            )
            managers.append(manager)
        self.single_type_managers: tuple[SingleTypeKVCacheManager, ...] = tuple(managers)
        self.hit_finder = PrefixHitFinder(
            kv_cache_config, hash_block_size, scheduler_block_size, self.eagle_group_ids
        )
        for group in self.hit_finder.spec_groups:
            for group_id in group.group_ids:
                self.single_type_managers[group_id].use_eagle = group.use_eagle
        self.retention_interval = options.retention_interval
        validate_retention_interval(
            options.retention_interval, scheduler_block_size, kv_cache_config
        )

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_cache_hit_length: int
    ) -> tuple[HitBlocks, int]:
        return self.hit_finder.find_longest_cache_hit(
            self.block_pool, block_hashes, max_cache_hit_length
        )

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: tuple[Sequence[KVCacheBlock], ...],
        total_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        return sum(
            manager.get_num_blocks_to_allocate(
                request_id,
                num_tokens,
                new_computed_blocks[i],
                total_computed_tokens,
                num_tokens_main_model,
                apply_admission_cap,
            )
            for i, manager in enumerate(self.single_type_managers)
        )

    def allocate_new_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: tuple[Sequence[KVCacheBlock], ...],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        for i, manager in enumerate(self.single_type_managers):
            manager.allocate_new_computed_blocks(
                request_id,
                new_computed_blocks[i],
                num_local_computed_tokens,
                num_external_computed_tokens,
            )

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> HitBlocks:
        return tuple(
            manager.allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
            for manager in self.single_type_managers
        )

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        for manager in self.single_type_managers:
            manager.cache_blocks(request, num_computed_tokens, self.retention_interval)

    def remove_skipped_blocks(self, request_id: str, total_computed_tokens: int) -> None:
        for manager in self.single_type_managers:
            manager.remove_skipped_blocks(request_id, total_computed_tokens)

    def free(self, request_id: str) -> None:
        for manager in self.single_type_managers:
            manager.free(request_id)

    def get_blocks(self, request_id: str) -> HitBlocks:
        return tuple(
            list(manager.req_to_blocks.get(request_id) or [])
            for manager in self.single_type_managers
        )

    def new_step_starts(self) -> None:
        for manager in self.single_type_managers:
            manager.new_step_starts()


class KVCacheCoordinatorNoPrefixCache(KVCacheCoordinator):
    """Prefix caching off: allocation only, never a hit."""

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_cache_hit_length: int
    ) -> tuple[HitBlocks, int]:
        return tuple([] for _ in self.single_type_managers), 0


class UnitaryKVCacheCoordinator(KVCacheCoordinator):
    """One KV cache group: its block size is both hash and scheduling granularity."""

    def __init__(self, kv_cache_config: KVCacheConfig, options: CacheOptions) -> None:
        super().__init__(kv_cache_config, options)
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        if self.enable_caching and self.hash_block_size != block_size:
            raise ValueError(
                f"a single-group model needs hash_block_size == block_size "
                f"({self.hash_block_size} != {block_size})"
            )


class HybridKVCacheCoordinator(KVCacheCoordinator):
    """Several groups, of different kinds or block sizes."""

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Cache only up to the last scheduler-aligned boundary: hits never end
        elsewhere. EAGLE groups also cache the one block they peek past it."""
        aligned = num_computed_tokens // self.scheduler_block_size * self.scheduler_block_size
        for manager in self.single_type_managers:
            num_tokens = aligned
            if manager.use_eagle and aligned > 0:
                num_tokens = min(num_computed_tokens, aligned + manager.block_size)
            manager.cache_blocks(request, num_tokens, self.retention_interval)


@dataclass(frozen=True)
class CacheOptions:
    """Everything below `KVCacheManager`'s vLLM-shaped signature needs, in one value:
    the manager resolves its arguments once and hands this down to the coordinator,
    which gives the pool and the per-group managers what each uses."""

    max_model_len: int
    hash_block_size: int
    scheduler_block_size: int
    max_num_batched_tokens: int
    enable_caching: bool = True
    use_eagle: bool = False
    enable_kv_cache_events: bool = False
    retention_interval: int | None = None
    use_int_event_hashes: bool = True
    probation_fraction: float | None = None

    @classmethod
    def resolve(
        cls,
        kv_cache_config: KVCacheConfig,
        *,
        max_model_len: int,
        hash_block_size: int,
        scheduler_block_size: int | None,
        max_num_batched_tokens: int | None,
        **flags: Any,
    ) -> CacheOptions:
        """The options with defaults derived from the config, after checking that the
        block sizes agree."""
        if scheduler_block_size is None:
            scheduler_block_size = default_scheduler_block_size(kv_cache_config)
        sizes = [g.kv_cache_spec.block_size for g in kv_cache_config.kv_cache_groups]
        if hash_block_size <= 0 or scheduler_block_size % hash_block_size:
            raise ValueError(
                f"scheduler_block_size {scheduler_block_size} must be a multiple of "
                f"hash_block_size {hash_block_size}"
            )
        if len(sizes) > 1 and any(size % hash_block_size for size in sizes):
            raise ValueError(
                f"every group block size {sizes} must be a multiple of hash_block_size"
            )
        if any(scheduler_block_size % size for size in sizes):
            raise ValueError(
                f"scheduler_block_size {scheduler_block_size} must be a multiple of every "
                f"group block size {sizes}"
            )
        return cls(
            max_model_len=max_model_len,
            hash_block_size=hash_block_size,
            scheduler_block_size=scheduler_block_size,
            max_num_batched_tokens=max_num_batched_tokens or max_model_len,
            **flags,
        )


def get_kv_cache_coordinator(
    kv_cache_config: KVCacheConfig, options: CacheOptions
) -> KVCacheCoordinator:
    """The coordinator for a config: no prefix cache, one group, or several."""
    if not options.enable_caching:
        return KVCacheCoordinatorNoPrefixCache(kv_cache_config, options)
    if len(kv_cache_config.kv_cache_groups) == 1:
        return UnitaryKVCacheCoordinator(kv_cache_config, options)
    return HybridKVCacheCoordinator(kv_cache_config, options)
