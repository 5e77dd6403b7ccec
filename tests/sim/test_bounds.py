"""Hit-rate bounds against brute force, block-level references and hand-checked cases."""

from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict

import pytest

from kvroute.benchmarks.sim.bounds import (
    belady_hit_rate,
    infinite_cache_hit_rate,
    pooled_lru_hit_rate,
)
from kvroute.benchmarks.sim.traces import load_mooncake
from kvroute.benchmarks.sim.workload import (
    ContentBlock,
    LiteralTokens,
    PromptSpec,
    SimRequest,
    Workload,
    block_keys,
)

VOCAB = 32_000
BLOCK = 4


def workload_of(*prompts: tuple[ContentBlock | LiteralTokens, ...]) -> Workload:
    requests = [
        SimRequest(f"r{i}", PromptSpec(p, VOCAB), 1, arrival_s=float(i))
        for i, p in enumerate(prompts)
    ]
    return Workload("hand", requests)


def C(block_id: int, length: int) -> ContentBlock:
    return ContentBlock(block_id, length)


def lookups(workload: Workload, block_size: int) -> list[tuple[list[int], int]]:
    """Each request's block keys and how many of them a hit may cover."""
    return [
        (block_keys(r, block_size), (r.num_tokens - 1) // block_size)
        for r in workload.in_processing_order()
    ]


def prefix_in(cache: set[int] | OrderedDict[int, None], keys: list[int]) -> int:
    return next((j for j, key in enumerate(keys) if key not in cache), len(keys))


def brute_force_optimum(workload: Workload, block_size: int, capacity: int) -> int:
    """Most prefix-hit tokens over every choice of blocks to keep after every request.

    A bigger cache never hits less and can always shrink later, so keeping as many
    blocks as fit is never worse: only maximal subsets of cache + request are tried.
    """
    states = {frozenset(): 0}
    for keys, hittable in lookups(workload, block_size):
        following: dict[frozenset[int], int] = {}
        for cache, hits in states.items():
            gained = hits + min(prefix_in(cache, keys), hittable)
            pool = cache | set(keys)
            for kept in itertools.combinations(sorted(pool), min(capacity, len(pool))):
                state = frozenset(kept)
                following[state] = max(following.get(state, -1), gained)
        states = following
    return max(states.values()) * block_size


def reference_lru(workload: Workload, block_size: int, capacity: int) -> int:
    """Per-block LRU: touch the request's blocks deepest first, evict the least recent."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for keys, hittable in lookups(workload, block_size):
        hits += min(prefix_in(cache, keys), hittable)
        for key in reversed(keys):
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits * block_size


def reference_belady(workload: Workload, block_size: int, capacity: int) -> int:
    """Per-block greedy: keep the blocks next used soonest (deeper dropped first on ties);
    a block next seen where it cannot hit counts as never used."""
    seq = lookups(workload, block_size)
    cache: set[int] = set()
    depth: dict[int, int] = {}
    hits = 0
    for time, (keys, hittable) in enumerate(seq):
        hits += min(prefix_in(cache, keys), hittable)
        depth.update((key, j) for j, key in enumerate(keys))

        def next_use(key: int, after: int = time) -> float:
            for later in range(after + 1, len(seq)):
                later_keys, later_hittable = seq[later]
                if key in later_keys:
                    return later if later_keys.index(key) < later_hittable else math.inf
            return math.inf

        ranked = sorted(cache | set(keys), key=lambda k: (next_use(k), depth[k]))
        cache = {k for k in ranked[:capacity] if next_use(k) != math.inf}
    return hits * block_size


def random_workload(rng: random.Random, count: int, max_segment: int) -> Workload:
    """Requests that share, cut and extend earlier prompts; segments may be misaligned,
    block-aligned prompts occur (their last block is inserted but cannot hit)."""
    prompts: list[tuple[ContentBlock | LiteralTokens, ...]] = []
    for _ in range(count):
        segments: list[ContentBlock | LiteralTokens] = []
        if prompts and rng.random() < 0.8:
            base = rng.choice(prompts)
            segments = list(base[: rng.randint(1, len(base))])
            last = segments[-1]
            if isinstance(last, ContentBlock) and rng.random() < 0.3:
                segments[-1] = C(last.block_id, rng.randint(1, max_segment))
        for _ in range(rng.randint(0 if segments else 1, 2)):
            if rng.random() < 0.1:
                segments.append(LiteralTokens(tuple(rng.randrange(VOCAB) for _ in range(BLOCK))))
            else:
                length = rng.choice([BLOCK, 2 * BLOCK, rng.randint(1, max_segment)])
                segments.append(C(rng.randrange(4), min(length, max_segment)))
        prompts.append(tuple(segments))
    return workload_of(*prompts)


def test_belady_equals_the_brute_force_optimum_on_tiny_workloads() -> None:
    rng = random.Random(7)
    checked = 0
    while checked < 600:
        workload = random_workload(rng, rng.randint(6, 8), max_segment=2 * BLOCK)
        distinct = {k for keys, _ in lookups(workload, BLOCK) for k in keys}
        capacity = rng.randint(1, 6)
        if len(distinct) > 10 or capacity >= len(distinct):
            continue
        expected = brute_force_optimum(workload, BLOCK, capacity)
        assert belady_hit_rate(workload, BLOCK, capacity).hit_tokens == expected, (
            checked,
            capacity,
        )
        checked += 1


def test_bounds_match_block_level_references_on_random_workloads() -> None:
    rng = random.Random(11)
    for case in range(200):
        workload = random_workload(rng, rng.randint(5, 30), max_segment=4 * BLOCK)
        capacity = rng.randint(0, 25)
        lru = pooled_lru_hit_rate(workload, BLOCK, capacity).hit_tokens
        belady = belady_hit_rate(workload, BLOCK, capacity).hit_tokens
        infinite = infinite_cache_hit_rate(workload, BLOCK).hit_tokens
        assert lru == reference_lru(workload, BLOCK, capacity), case
        assert belady == reference_belady(workload, BLOCK, capacity), case
        assert infinite == reference_lru(workload, BLOCK, 10**9), case
        assert infinite >= belady >= lru, case


def test_unbounded_capacity_reaches_the_infinite_cache() -> None:
    workload = random_workload(random.Random(3), 40, max_segment=4 * BLOCK)
    infinite = infinite_cache_hit_rate(workload, BLOCK)
    assert pooled_lru_hit_rate(workload, BLOCK, 10**6) == infinite
    assert belady_hit_rate(workload, BLOCK, 10**6) == infinite


def test_a_hit_never_covers_the_whole_prompt() -> None:
    # x0 x1 | x0 x1: the second request is block-aligned, so only x0 may hit.
    workload = workload_of((C(1, 8),), (C(1, 8),), (C(1, 9),))
    assert infinite_cache_hit_rate(workload, BLOCK).hit_tokens == 4 + 8
    assert belady_hit_rate(workload, BLOCK, 2).hit_tokens == 12
    assert pooled_lru_hit_rate(workload, BLOCK, 2).hit_tokens == 12


def test_lru_evicts_deepest_blocks_first_and_belady_keeps_what_comes_back() -> None:
    # X = x0 x1 x2 (12 tokens), then Y = y0 y1, then X again; two blocks of cache.
    workload = workload_of((C(1, 12),), (C(2, 8),), (C(1, 12),))
    infinite = infinite_cache_hit_rate(workload, BLOCK)
    assert (infinite.hit_tokens, infinite.prompt_tokens) == (8, 32)
    assert infinite.rate == 0.25
    assert pooled_lru_hit_rate(workload, BLOCK, 2).hit_tokens == 0
    assert belady_hit_rate(workload, BLOCK, 2).hit_tokens == 8
    assert pooled_lru_hit_rate(workload, BLOCK, 3).hit_tokens == 4  # x0 survives Y, x1 does not
    assert pooled_lru_hit_rate(workload, BLOCK, 4).hit_tokens == 8


def test_belady_evicts_the_farthest_next_use_deeper_first() -> None:
    # A = a0 a1 a2 +1 token, B = b0 b1 +1 token, alternating: A B A B.
    a, b = (C(1, 12), C(9, 1)), (C(2, 8), C(8, 1))
    workload = workload_of(a, b, a, b)
    assert infinite_cache_hit_rate(workload, BLOCK).hit_tokens == 12 + 8
    # Three blocks: keep A (next used first), dropping b1 then b0; LRU keeps a0 b0 b1.
    assert belady_hit_rate(workload, BLOCK, 3).hit_tokens == 12
    assert pooled_lru_hit_rate(workload, BLOCK, 3).hit_tokens == 4
    # Two blocks: a0 a1 (a2 is deeper, dropped first), or b0 b1: either way 8 tokens.
    assert belady_hit_rate(workload, BLOCK, 2).hit_tokens == 8
    assert pooled_lru_hit_rate(workload, BLOCK, 2).hit_tokens == 0


def test_partial_trace_block_hits_its_full_blocks_at_a_finer_size() -> None:
    # One id covers 100 tokens, later all 512 of them: 6 blocks of 16 were seen.
    workload = workload_of((C(0, 512), C(1, 100)), (C(0, 512), C(1, 512), C(2, 7)))
    assert infinite_cache_hit_rate(workload, 16).hit_tokens == 512 + 96
    assert infinite_cache_hit_rate(workload, 512).hit_tokens == 512


def test_closed_loop_workloads_are_bounded_in_list_order() -> None:
    first = SimRequest("a", PromptSpec((C(1, 8), C(2, 4)), VOCAB), 1, arrival_s=5.0)
    second = SimRequest("b", PromptSpec((C(1, 8), C(3, 4)), VOCAB), 1, after="a")
    third = SimRequest("c", PromptSpec((C(1, 8), C(4, 4)), VOCAB), 1, arrival_s=0.0)
    workload = Workload("closed", [first, second, third])
    assert infinite_cache_hit_rate(workload, BLOCK).hit_tokens == 8 + 8


def test_negative_capacity_is_refused() -> None:
    workload = workload_of((C(1, 8),))
    with pytest.raises(ValueError, match="capacity_blocks -1"):
        belady_hit_rate(workload, BLOCK, -1)
    with pytest.raises(ValueError, match="capacity_blocks -1"):
        pooled_lru_hit_rate(workload, BLOCK, -1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trace", "infinite", "lru", "belady"),
    [
        ("conversation", 54_097_440, 39_215_728, 54_097_440),
        ("synthetic", 39_850_800, 33_254_064, 39_850_800),
    ],
)
def test_mooncake_bounds_for_8_replicas_of_64000_blocks(
    trace: str, infinite: int, lru: int, belady: int
) -> None:
    workload = load_mooncake(trace)
    capacity = 8 * 64_000
    assert infinite_cache_hit_rate(workload, 16).hit_tokens == infinite
    assert pooled_lru_hit_rate(workload, 16, capacity).hit_tokens == lru
    assert belady_hit_rate(workload, 16, capacity).hit_tokens == belady


@pytest.mark.slow
def test_belady_reaches_the_conversation_ceiling_with_8131_trace_blocks() -> None:
    workload = load_mooncake("conversation")
    ceiling = infinite_cache_hit_rate(workload, 512).hit_tokens
    assert ceiling == 54_063_104  # 37.34%: the README's 37.4% also counts partial last blocks
    assert belady_hit_rate(workload, 512, 8_131).hit_tokens == ceiling
    assert belady_hit_rate(workload, 512, 8_130).hit_tokens < ceiling
