"""Block-manager throughput: get_computed_blocks -> allocate_slots -> free per request.

The trace: N requests of L tokens; a `shared` fraction of each prompt is one of
a few common prefixes, the rest is unique, so the cache both hits and evicts.
Each configuration replays the same trace on a fresh manager, draining
`take_events()` after every request when events are on (as an engine does
once per step). Hashing happens when a request is created, as in an engine,
and is timed in its own column.

Run: python benchmarks/block_manager.py [--requests 2000 --tokens 2048 ...]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from events.hashing import get_hash_fn_by_name
from replicas.kv_cache.manager import KVCacheManager
from replicas.kv_cache.specs import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from replicas.kv_cache.utils import get_request_block_hasher, init_none_hash
from replicas.request import Request, SamplingParams

# vLLM's own manager on this machine, as measured for the issue (requests/s).
VLLM_REFERENCE = {True: 1050.0, False: 2400.0}
NUM_PREFIXES = 8


@dataclass(frozen=True)
class Case:
    model: str
    hash_name: str
    events: bool


@dataclass
class Result:
    case: Case
    requests_per_s: float
    blocks_per_s: float
    us_get: float
    us_alloc: float
    us_free: float
    us_hash: float
    hit_rate: float


def make_config(model: str, block_size: int, num_blocks: int) -> KVCacheConfig:
    full = FullAttentionSpec(
        block_size=block_size, num_kv_heads=8, head_size=128, dtype=torch.bfloat16
    )
    groups = [KVCacheGroupSpec(["full"], full)]
    if model == "full+swa":
        swa = SlidingWindowSpec(
            block_size=block_size,
            num_kv_heads=8,
            head_size=128,
            dtype=torch.bfloat16,
            sliding_window=64 * block_size,
        )
        groups.append(KVCacheGroupSpec(["swa"], swa))
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_groups=groups)


def make_prompts(num_requests: int, num_tokens: int, shared: float, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix_len = int(num_tokens * shared)
    prefixes = [[rng.randrange(32_000) for _ in range(prefix_len)] for _ in range(NUM_PREFIXES)]
    prompts = []
    for _ in range(num_requests):
        suffix = [rng.randrange(32_000) for _ in range(num_tokens - prefix_len)]
        prompts.append(rng.choice(prefixes) + suffix)
    return prompts


def run_case(case: Case, prompts: list[list[int]], args: argparse.Namespace) -> Result:
    hash_fn = get_hash_fn_by_name(case.hash_name)
    init_none_hash(hash_fn, seed="0")
    config = make_config(case.model, args.block_size, args.num_blocks)
    manager = KVCacheManager(
        config,
        max_model_len=args.tokens + args.block_size,
        enable_caching=True,
        enable_kv_cache_events=case.events,
        hash_block_size=args.block_size,
    )
    hasher = get_request_block_hasher(args.block_size, hash_fn)
    params = SamplingParams(max_tokens=1)
    t_hash = t_get = t_alloc = t_free = 0.0
    hit_tokens = blocks = 0
    clock = time.perf_counter
    for i, prompt in enumerate(prompts):
        t0 = clock()
        request = Request(str(i), prompt, params, block_hasher=hasher)
        t1 = clock()
        computed, num_computed = manager.get_computed_blocks(request)
        t2 = clock()
        new_blocks = manager.allocate_slots(
            request, len(prompt) - num_computed, num_computed, computed
        )
        if case.events:
            manager.take_events()
        t3 = clock()
        manager.free(request)
        if case.events:
            manager.take_events()
        t4 = clock()
        if new_blocks is None:
            raise RuntimeError("the pool is too small for one request; raise --num-blocks")
        t_hash += t1 - t0
        t_get += t2 - t1
        t_alloc += t3 - t2
        t_free += t4 - t3
        hit_tokens += num_computed
        blocks += sum(len(g) for g in new_blocks.blocks)
    n = len(prompts)
    managed = t_get + t_alloc + t_free
    return Result(
        case=case,
        requests_per_s=n / managed,
        blocks_per_s=blocks / managed,
        us_get=1e6 * t_get / n,
        us_alloc=1e6 * t_alloc / n,
        us_free=1e6 * t_free / n,
        us_hash=1e6 * t_hash / n,
        hit_rate=hit_tokens / sum(len(p) for p in prompts),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shared", type=float, default=0.5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompts = make_prompts(args.requests, args.tokens, args.shared, args.seed)
    cases = [
        Case(model, hash_name, events)
        for model in ("full", "full+swa")
        for hash_name in ("sha256", "xxhash")
        for events in (True, False)
    ]
    runs: dict[Case, list[Result]] = {c: [] for c in cases}
    with tqdm(total=len(cases) * args.repeats, desc="block manager", unit="run") as bar:
        for _ in range(args.repeats):
            for case in cases:
                runs[case].append(run_case(case, prompts, args))
                bar.update()

    print(
        f"\n{args.requests} requests x {args.tokens} tokens, {args.shared:.0%} shared prefix "
        f"({NUM_PREFIXES} prefixes), block size {args.block_size}, {args.num_blocks} blocks; "
        f"median of {args.repeats} runs\n"
    )
    header = (
        f"{'model':<9} {'hash':<7} {'events':<6} {'req/s':>8} {'blocks/s':>10} "
        f"{'get us':>7} {'alloc us':>8} {'free us':>7} {'hash us':>8} {'hit':>6} "
        f"{'vs vLLM':>8}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        results = runs[case]

        def med(field: str, results: list[Result] = results) -> float:
            return statistics.median(getattr(r, field) for r in results)

        ratio = med("requests_per_s") / VLLM_REFERENCE[case.events]
        print(
            f"{case.model:<9} {case.hash_name:<7} {'on' if case.events else 'off':<6} "
            f"{med('requests_per_s'):>8.0f} {med('blocks_per_s'):>10.0f} "
            f"{med('us_get'):>7.1f} {med('us_alloc'):>8.1f} {med('us_free'):>7.1f} "
            f"{med('us_hash'):>8.1f} {med('hit_rate'):>6.1%} {ratio:>7.2f}x"
        )
    print(
        "\nvs vLLM: requests/s over vLLM's own manager on this machine as quoted in the "
        f"issue ({VLLM_REFERENCE[True]:.0f} req/s events on, {VLLM_REFERENCE[False]:.0f} "
        "events off, the low end of its 2,400-4,400 range); hashing is excluded from "
        "req/s on both sides."
    )


if __name__ == "__main__":
    main()
