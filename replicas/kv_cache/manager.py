"""KVCacheManager: the scheduler's interface to the block manager.

Call order per request, as in an engine: `get_computed_blocks` once when the
request is first scheduled, `allocate_slots` every step it runs, `free` when it
finishes or is preempted. `take_events` drains what the pool emitted, with each
BlockStored annotated with its group's kind and window for the router.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvroute.events.kv_events import BlockStored, KVCacheEvent
from kvroute.replicas.kv_cache.block_pool import BlockPool
from kvroute.replicas.kv_cache.coordinator import (
    CacheOptions,
    KVCacheCoordinator,
    get_kv_cache_coordinator,
)
from kvroute.replicas.kv_cache.specs import KVCacheConfig
from kvroute.replicas.kv_cache.utils import KVCacheBlock
from kvroute.replicas.request import Request

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_ENV = "KVROUTE_PREFIX_CACHE_RETENTION_INTERVAL"

__all__ = ["KVCacheBlocks", "KVCacheManager", "PrefixCacheStats", "Request", "logger"]


@dataclass
class KVCacheBlocks:
    """Blocks of one request, one sequence per KV cache group."""

    blocks: tuple[Sequence[KVCacheBlock], ...]

    def __add__(self, other: KVCacheBlocks) -> KVCacheBlocks:
        return KVCacheBlocks(
            tuple([*mine, *theirs] for mine, theirs in zip(self.blocks, other.blocks, strict=True))
        )

    def get_block_ids(self) -> tuple[list[int], ...]:
        return tuple([block.block_id for block in group] for group in self.blocks)

    def get_unhashed_block_ids(self) -> list[int]:
        if len(self.blocks) != 1:
            raise ValueError("get_unhashed_block_ids() needs exactly one KV cache group")
        return [block.block_id for block in self.blocks[0] if block.block_hash is None]

    def new_empty(self) -> KVCacheBlocks:
        return KVCacheBlocks(tuple(() for _ in self.blocks))


@dataclass
class PrefixCacheStats:
    """Counters of prefix-cache lookups since the last `make_prefix_cache_stats`."""

    requests: int = 0
    queries: int = 0
    hits: int = 0
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0
    reset: bool = False
    hit_lengths: list[int] = field(default_factory=list)

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> None:
        if preempted:
            self.preempted_requests += 1
            self.preempted_queries += num_tokens
            self.preempted_hits += num_hits
        else:
            self.requests += 1
            self.queries += num_tokens
            self.hits += num_hits
        self.hit_lengths.append(num_hits)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def resolve_retention_interval(value: int | None) -> int | None:
    """The sparse-retention interval: the argument, else the environment variable."""
    if value is not None:
        return value
    raw = os.getenv(RETENTION_INTERVAL_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{RETENTION_INTERVAL_ENV} must be an integer, got {raw!r}") from None


class KVCacheManager:
    """Prefix-cached block allocation for one engine, over all KV cache groups."""

    def __init__(
        self,
        kv_cache_config: KVCacheConfig,
        max_model_len: int,
        hash_block_size: int,
        enable_caching: bool = True,
        use_eagle: bool = False,
        log_stats: bool = False,
        enable_kv_cache_events: bool = False,
        scheduler_block_size: int | None = None,
        max_num_batched_tokens: int | None = None,
        prefix_cache_retention_interval: int | None = None,
        use_int_event_hashes: bool = True,
        probation_fraction: float | None = None,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> None:
        if dcp_world_size != 1 or pcp_world_size != 1:
            raise ValueError("context parallelism is not supported by this block manager")
        if max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        if not kv_cache_config.kv_cache_groups:
            raise ValueError("KVCacheConfig has no KV cache groups")
        self.kv_cache_config = kv_cache_config
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.use_eagle = use_eagle
        self.log_stats = log_stats
        self.prefix_cache_stats: PrefixCacheStats | None = PrefixCacheStats() if log_stats else None
        options = CacheOptions.resolve(
            kv_cache_config,
            max_model_len=max_model_len,
            hash_block_size=hash_block_size,
            scheduler_block_size=scheduler_block_size,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_caching=enable_caching,
            use_eagle=use_eagle,
            enable_kv_cache_events=enable_kv_cache_events,
            retention_interval=resolve_retention_interval(prefix_cache_retention_interval),
            use_int_event_hashes=use_int_event_hashes,
            probation_fraction=probation_fraction,
        )
        self.coordinator: KVCacheCoordinator = get_kv_cache_coordinator(kv_cache_config, options)
        self.block_pool: BlockPool = self.coordinator.block_pool
        self.num_kv_cache_groups = len(kv_cache_config.kv_cache_groups)
        self.empty_kv_cache_blocks = KVCacheBlocks(
            tuple(() for _ in range(self.num_kv_cache_groups))
        )
        self._group_specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def make_prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Hand out the counters gathered so far and start new ones."""
        stats = self.prefix_cache_stats
        if stats is None:
            return None
        self.prefix_cache_stats = PrefixCacheStats()
        return stats

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """The longest cached prefix of a request not yet scheduled.

        Never the whole prompt: the last token is always recomputed to get its
        logits. Requests that want prompt logprobs skip the cache entirely.
        """
        if not self.enable_caching or request.wants_prompt_logprobs:
            return self.empty_kv_cache_blocks, 0
        max_cache_hit_length = request.num_tokens - 1
        blocks, num_computed = self.coordinator.find_longest_cache_hit(
            request.block_hashes, max_cache_hit_length
        )
        if self.prefix_cache_stats is not None:
            self.prefix_cache_stats.record(
                num_tokens=request.num_tokens,
                num_hits=num_computed,
                preempted=request.num_preemptions > 0,
            )
        return self._blocks(blocks), num_computed

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        num_lookahead_tokens: int = 0,
        num_external_computed_tokens: int = 0,
        delay_cache_blocks: bool = False,
        full_sequence_must_fit: bool = False,
    ) -> KVCacheBlocks | None:
        """Reserve slots for `num_new_tokens` more tokens (plus lookahead), taking
        the prefix hit in `new_computed_blocks`; None if the pool cannot fit them.

        A refusal changes nothing: hit blocks are only touched after the check.
        With `full_sequence_must_fit`, admission also requires room for the whole
        prompt (sliding-window groups counted at their recycled steady state).
        """
        if num_new_tokens < 0 or num_new_computed_tokens < 0 or num_lookahead_tokens < 0:
            raise ValueError("token counts passed to allocate_slots must be non-negative")
        if num_new_tokens == 0 and num_external_computed_tokens == 0:
            raise ValueError(
                "num_new_tokens must be greater than 0 when there are no external computed tokens"
            )
        computed = (
            new_computed_blocks.blocks
            if new_computed_blocks is not None
            else self.empty_kv_cache_blocks.blocks
        )
        request_id = request.request_id
        coordinator = self.coordinator
        num_local_computed = request.num_computed_tokens + num_new_computed_tokens
        total_computed = min(num_local_computed + num_external_computed_tokens, self.max_model_len)
        if full_sequence_must_fit:
            full_num_tokens = min(request.num_tokens, self.max_model_len)
            needed = coordinator.get_num_blocks_to_allocate(
                request_id,
                full_num_tokens,
                computed,
                total_computed,
                full_num_tokens,
                apply_admission_cap=True,
            )
            if needed > self.block_pool.get_num_free_blocks():
                return None
        num_tokens_main_model = total_computed + num_new_tokens
        num_tokens_need_slot = min(num_tokens_main_model + num_lookahead_tokens, self.max_model_len)
        coordinator.remove_skipped_blocks(request_id, total_computed)
        needed = coordinator.get_num_blocks_to_allocate(
            request_id,
            num_tokens_need_slot,
            computed,
            num_local_computed + num_external_computed_tokens,
            num_tokens_main_model,
        )
        if needed > self.block_pool.get_num_free_blocks():
            return None
        if any(computed) or num_external_computed_tokens > 0:
            coordinator.allocate_new_computed_blocks(
                request_id, computed, num_local_computed, num_external_computed_tokens
            )
        new_blocks = coordinator.allocate_new_blocks(
            request_id, num_tokens_need_slot, num_tokens_main_model
        )
        if self.enable_caching and not delay_cache_blocks:
            # Only finalized tokens are cached, never unverified draft tokens.
            coordinator.cache_blocks(
                request, min(total_computed + num_new_tokens, request.num_tokens)
            )
        return self._blocks(new_blocks)

    def free(self, request: Request) -> None:
        """Release a finished or preempted request's blocks (tail blocks first)."""
        self.coordinator.free(request.request_id)

    def uncache_uncomputed(self, request: Request) -> set[int]:
        """Drop from the prefix cache the request's blocks past its computed tokens.

        A block is cached when it is allocated, before the step that writes its KV
        runs; if that step failed for the request, no later request may hit it.
        Blocks before `num_computed_tokens` were written by earlier steps (or were
        hits) and stay cached. Returns the ids of the blocks dropped."""
        groups = self.kv_cache_config.kv_cache_groups
        dropped: set[int] = set()
        for group, blocks in enumerate(self.coordinator.get_blocks(request.request_id)):
            first = request.num_computed_tokens // groups[group].kv_cache_spec.block_size
            dropped.update(self.block_pool.uncache(blocks[first:]))
        return dropped

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; False (and nothing dropped) while blocks are in use."""
        if not self.block_pool.reset_prefix_cache():
            return False
        if self.prefix_cache_stats is not None:
            self.prefix_cache_stats.reset = True
        return True

    def new_step_starts(self) -> None:
        """Mark an engine step boundary (per-step caching state resets)."""
        self.coordinator.new_step_starts()

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        return self._blocks(self.coordinator.get_blocks(request_id))

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return self.get_blocks(request_id).get_block_ids()

    def take_events(self) -> list[KVCacheEvent]:
        """Drain the pool's events, tagging each BlockStored with its group's kind
        and sliding window. An event naming an unknown group passes through
        untagged, with a warning."""
        events = self.block_pool.take_events()
        specs = self._group_specs
        for event in events:
            if type(event) is not BlockStored:
                continue
            idx = event.group_idx
            if idx is None:
                continue
            if not 0 <= idx < len(specs):
                logger.warning("Group index `%s` not in KV cache metadata", idx)
                continue
            spec = specs[idx]
            event.kv_cache_spec_kind = spec.kind.value
            event.kv_cache_spec_sliding_window = spec.event_sliding_window
        return events

    def _blocks(self, blocks: tuple[Sequence[KVCacheBlock], ...]) -> KVCacheBlocks:
        return KVCacheBlocks(blocks) if any(blocks) else self.empty_kv_cache_blocks
