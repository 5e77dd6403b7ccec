"""Differential and invariant checks: the same random op sequence on a manager
with prefix caching and one without.

Each request is prefilled in one step, decodes a few tokens one step at a time
and is freed. Both managers must give every request the same number of blocks
per group at every step (hits only change which blocks, never how many), and
the caching manager must keep its books straight throughout: reference counts,
the free queue, the cache map, and the content behind every hit. Every hit
must equal a brute-force oracle's (`tests.replicas.hit_oracle`), which applies
the hit rules to the cached blocks without the manager's hit finder; some
steps evict a random free cached block of any group, so groups that share a
spec do not always hold the same blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from kvroute.events.kv_events import BlockRemoved
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.segmented import SegmentedFreeBlockQueue
from kvroute.replicas.kv_cache.specs import KVCacheSpec
from kvroute.replicas.kv_cache.utils import (
    BlockHashListWithBlockSize,
    make_block_hash_with_group_id,
)
from kvroute.replicas.request import Request
from tests.replicas.conftest import full, mamba, manager, request, swa
from tests.replicas.hit_oracle import brute_force_hit

CONFIGS: dict[str, tuple[KVCacheSpec, ...]] = {
    "full": (full(4),),
    "swa": (swa(4, 8),),
    "full+swa": (full(4), swa(4, 8)),
    "full8+swa4+mamba8": (full(8), swa(4, 12), mamba(8)),
    "full+2swa": (full(4), swa(4, 4), swa(4, 16)),
    # Groups sharing a spec, and windows that are not a whole number of blocks
    # (9 = 2 blocks + 1 token, 6 = 1 block + 2 tokens: `window - 1` matters).
    "full+swa+swa": (full(4), swa(4, 8), swa(4, 8)),
    "full+full+swa9": (full(4), full(4), swa(4, 9)),
    "full+swa6": (full(4), swa(4, 6)),
    # Full attention in blocks smaller than the hit alignment (lcm 8).
    "full4+swa8": (full(4), swa(8, 16)),
}
PREFIXES = [[100 + p] * 4 * n for p, n in enumerate((3, 5, 8))]


@dataclass
class Live:
    on: Request
    off: Request
    decode_left: int


def _check_books(mgr: KVCacheManager, live: list[Request]) -> None:
    """Reference counts, free queue and cache map agree with the block tables,
    and every cached block in a table holds that request's content."""
    pool = mgr.block_pool
    owners: dict[int, int] = {}
    for req in live:
        for group_id, blocks in enumerate(mgr.coordinator.get_blocks(req.request_id)):
            spec = mgr.kv_cache_config.kv_cache_groups[group_id].kv_cache_spec
            hashes = (
                req.block_hashes
                if spec.block_size == pool.hash_block_size
                else BlockHashListWithBlockSize(
                    req.block_hashes, pool.hash_block_size, spec.block_size
                )
            )
            for position, block in enumerate(blocks):
                if block.is_null:
                    continue
                owners[block.block_id] = owners.get(block.block_id, 0) + 1
                if block.block_hash is not None:
                    expected = make_block_hash_with_group_id(hashes[position], group_id)
                    assert block.block_hash == expected, "a table holds another prefix's block"
    for block in pool.blocks[1:]:
        assert block.ref_cnt == owners.get(block.block_id, 0), f"ref_cnt of {block.block_id}"
    free_ids = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
    assert free_ids == {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
    assert pool.get_num_free_blocks() == len(free_ids)
    queue = pool.free_block_queue
    if isinstance(queue, SegmentedFreeBlockQueue):
        free = queue.get_all_free_blocks()
        protected = [b.reused for b in free]
        assert queue.num_protected == sum(protected)
        # Probation blocks, then protected ones: the sentinel splits them.
        assert protected == sorted(protected)
    cached = 0
    for key, entry in pool.cached_block_hash_to_block._cache.items():
        blocks = [entry] if not isinstance(entry, dict) else list(entry.values())
        assert blocks, "empty entry left in the cache map"
        for block in blocks:
            assert block.block_hash == key
            cached += 1
    assert cached == sum(1 for b in pool.blocks if b.block_hash is not None)


def _check_hit(mgr: KVCacheManager, req: Request, hit: int, hit_blocks: tuple) -> None:
    assert 0 <= hit <= max(req.num_tokens - 1, 0)
    assert hit % mgr.coordinator.scheduler_block_size == 0
    for group_id, blocks in enumerate(hit_blocks):
        block_size = mgr.kv_cache_config.kv_cache_groups[group_id].kv_cache_spec.block_size
        assert len(blocks) in (0, hit // block_size)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("probation_fraction", [None, 0.5], ids=["lru", "slru"])
def test_caching_changes_which_blocks_never_how_many(
    name: str, seed: int, probation_fraction: float | None
) -> None:
    specs = CONFIGS[name]
    rng = random.Random(seed)
    on = manager(
        120,
        *specs,
        enable_kv_cache_events=True,
        log_stats=True,
        probation_fraction=probation_fraction,
    )
    off = manager(120, *specs, enable_caching=False)
    block_size = min(s.block_size for s in specs)
    live: list[Live] = []
    total_hit = 0
    evictions = 0
    for step in range(250):
        on.new_step_starts()
        off.new_step_starts()
        if len(live) < 4 and rng.random() < 0.5:
            prompt = rng.choice(PREFIXES) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            pair = Live(
                request(f"{step}", prompt, block_size),
                request(f"{step}", prompt, block_size),
                rng.randrange(0, 12),
            )
            pair.on.reuse_hint_tokens = rng.choice((0, len(prompt) // 2, len(prompt)))
            hit_blocks, hit = on.get_computed_blocks(pair.on)
            _check_hit(on, pair.on, hit, hit_blocks.blocks)
            assert hit == brute_force_hit(on, pair.on, use_eagle=False), f"step {step}"
            got_on = on.allocate_slots(pair.on, len(prompt) - hit, hit, hit_blocks)
            got_off = off.allocate_slots(pair.off, len(prompt))
            assert (got_on is None) == (got_off is None)
            if got_on is not None:
                pair.on.num_computed_tokens = pair.off.num_computed_tokens = len(prompt)
                live.append(pair)
                total_hit += hit
        for pair in list(live):
            if pair.decode_left == 0 or rng.random() < 0.1:
                on.free(pair.on)
                off.free(pair.off)
                live.remove(pair)
                continue
            token = rng.randrange(50)
            for req, mgr in ((pair.on, on), (pair.off, off)):
                req.append_output_token_ids(token)
                assert mgr.allocate_slots(req, 1) is not None
                req.num_computed_tokens += 1
            pair.decode_left -= 1
        for pair in live:
            lengths_on = [len(b) for b in on.get_block_ids(pair.on.request_id)]
            lengths_off = [len(b) for b in off.get_block_ids(pair.off.request_id)]
            assert lengths_on == lengths_off
        if rng.random() < 0.2:
            free_cached = [
                b.block_id
                for b in on.block_pool.blocks[1:]
                if b.ref_cnt == 0 and b.block_hash is not None
            ]
            if free_cached:
                on.block_pool.evict_blocks([rng.choice(free_cached)])
        _check_books(on, [p.on for p in live])
        _check_books(off, [p.off for p in live])
        evictions += sum(isinstance(e, BlockRemoved) for e in on.take_events())
    for pair in live:
        on.free(pair.on)
        off.free(pair.off)
    assert on.block_pool.get_num_free_blocks() == off.block_pool.get_num_free_blocks() == 119
    stats = on.make_prefix_cache_stats()
    assert stats is not None and stats.hits == total_hit > 0
    assert evictions > 0, "the pool never came under pressure"
