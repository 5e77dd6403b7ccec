"""Block-manager throughput: get_computed_blocks -> allocate_slots -> free per request.

The trace: N requests of L tokens; a `shared` fraction of each prompt is one of
a few common prefixes, the rest is unique, so the cache both hits and evicts.
Each configuration replays the same trace on a fresh manager, draining
`take_events()` after every request when events are on (as an engine does
once per step). Hashing happens when a request is created, as in an engine,
and is timed in its own column.

Run: python -m benchmarks.block_manager [--requests 2000 --tokens 2048 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm import tqdm

NUM_PREFIXES = 8


def load_backend(name: str) -> SimpleNamespace:
    """The block manager under test: ours, or vLLM's (same names, same trace)."""
    if name == "kvroute":
        from kvroute.events.hashing import get_hash_fn_by_name
        from kvroute.replicas.kv_cache import specs
        from kvroute.replicas.kv_cache.manager import KVCacheManager
        from kvroute.replicas.kv_cache.utils import get_request_block_hasher, init_none_hash
        from kvroute.replicas.request import Request, SamplingParams

        def init_hash(fn: Any) -> None:
            init_none_hash(fn, seed="0")

    elif name == "vllm":
        import os

        os.environ.setdefault("PYTHONHASHSEED", "0")
        from vllm.sampling_params import SamplingParams  # type: ignore[import-not-found]
        from vllm.utils.hashing import get_hash_fn_by_name  # type: ignore[import-not-found]
        from vllm.v1 import kv_cache_interface as specs  # type: ignore[import-not-found]
        from vllm.v1.core.kv_cache_manager import KVCacheManager  # type: ignore[import-not-found]
        from vllm.v1.core.kv_cache_utils import (  # type: ignore[import-not-found]
            get_request_block_hasher,
            init_none_hash,
        )
        from vllm.v1.request import Request  # type: ignore[import-not-found]

        init_hash = init_none_hash
    else:
        raise ValueError(f"unknown backend {name!r}")
    return SimpleNamespace(
        name=name,
        specs=specs,
        KVCacheManager=KVCacheManager,
        Request=Request,
        SamplingParams=SamplingParams,
        get_hash_fn_by_name=get_hash_fn_by_name,
        get_request_block_hasher=get_request_block_hasher,
        init_hash=init_hash,
    )


@dataclass(frozen=True)
class Case:
    model: str
    hash_name: str
    events: bool


@dataclass
class Result:
    backend: str
    case: Case
    requests_per_s: float
    blocks_per_s: float
    us_get: float
    us_alloc: float
    us_free: float
    us_hash: float
    hit_rate: float


def make_config(backend: SimpleNamespace, model: str, block_size: int, num_blocks: int) -> Any:
    import torch

    specs = backend.specs
    full = specs.FullAttentionSpec(
        block_size=block_size, num_kv_heads=8, head_size=128, dtype=torch.bfloat16
    )
    groups = [specs.KVCacheGroupSpec(["full"], full)]
    if model == "full+swa":
        swa = specs.SlidingWindowSpec(
            block_size=block_size,
            num_kv_heads=8,
            head_size=128,
            dtype=torch.bfloat16,
            sliding_window=64 * block_size,
        )
        groups.append(specs.KVCacheGroupSpec(["swa"], swa))
    return specs.KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)


def make_prompts(num_requests: int, num_tokens: int, shared: float, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix_len = int(num_tokens * shared)
    prefixes = [[rng.randrange(32_000) for _ in range(prefix_len)] for _ in range(NUM_PREFIXES)]
    prompts = []
    for _ in range(num_requests):
        suffix = [rng.randrange(32_000) for _ in range(num_tokens - prefix_len)]
        prompts.append(rng.choice(prefixes) + suffix)
    return prompts


def run_case(
    backend: SimpleNamespace, case: Case, prompts: list[list[int]], args: argparse.Namespace
) -> Result:
    hash_fn = backend.get_hash_fn_by_name(case.hash_name)
    backend.init_hash(hash_fn)
    config = make_config(backend, case.model, args.block_size, args.num_blocks)
    manager = backend.KVCacheManager(
        config,
        max_model_len=args.tokens + args.block_size,
        enable_caching=True,
        enable_kv_cache_events=case.events,
        hash_block_size=args.block_size,
        scheduler_block_size=args.block_size,
    )
    hasher = backend.get_request_block_hasher(args.block_size, hash_fn)
    Request = backend.Request
    params = backend.SamplingParams(max_tokens=1)
    t_hash = t_get = t_alloc = t_free = 0.0
    hit_tokens = blocks = 0
    clock = time.perf_counter
    for i, prompt in enumerate(prompts):
        t0 = clock()
        request = Request(str(i), prompt, params, None, block_hasher=hasher)
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
        backend=backend.name,
        case=case,
        requests_per_s=n / managed,
        blocks_per_s=blocks / managed,
        us_get=1e6 * t_get / n,
        us_alloc=1e6 * t_alloc / n,
        us_free=1e6 * t_free / n,
        us_hash=1e6 * t_hash / n,
        hit_rate=hit_tokens / sum(len(p) for p in prompts),
    )


CASES = [
    Case(model, hash_name, events)
    for model in ("full", "full+swa")
    for hash_name in ("sha256", "xxhash")
    for events in (True, False)
]


def run_backend(backend_name: str, args: argparse.Namespace) -> list[Result]:
    """Every case once on one backend."""
    backend = load_backend(backend_name)
    prompts = make_prompts(args.requests, args.tokens, args.shared, args.seed)
    return [run_case(backend, case, prompts, args) for case in CASES]


def run_vllm_subprocess(python: str, args: argparse.Namespace) -> list[Result]:
    """Run the same trace on vLLM's manager, in the interpreter that has vLLM."""
    command = [
        python,
        "-m",
        "benchmarks.block_manager",
        "--backend=vllm",
        "--json",
        f"--requests={args.requests}",
        f"--tokens={args.tokens}",
        f"--shared={args.shared}",
        f"--block-size={args.block_size}",
        f"--num-blocks={args.num_blocks}",
        f"--seed={args.seed}",
    ]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [Result(**{**row, "case": Case(**row["case"])}) for row in rows]


def median_by_case(results: list[Result]) -> dict[Case, dict[str, float]]:
    grouped: dict[Case, list[Result]] = {}
    for result in results:
        grouped.setdefault(result.case, []).append(result)
    fields = ("requests_per_s", "blocks_per_s", "us_get", "us_alloc", "us_free", "us_hash")
    return {
        case: {f: statistics.median(getattr(r, f) for r in rs) for f in fields}
        | {"hit_rate": rs[0].hit_rate}
        for case, rs in grouped.items()
    }


def print_table(ours: list[Result], theirs: list[Result] | None, args: argparse.Namespace) -> None:
    print(
        f"\n{args.requests} requests x {args.tokens} tokens, {args.shared:.0%} shared prefix "
        f"({NUM_PREFIXES} prefixes), block size {args.block_size}, {args.num_blocks} blocks; "
        f"median of {args.repeats} runs; hashing excluded from req/s\n"
    )
    mine = median_by_case(ours)
    ref = median_by_case(theirs) if theirs else {}
    header = (
        f"{'model':<9} {'hash':<7} {'events':<6} {'req/s':>7} {'blocks/s':>9} "
        f"{'get us':>7} {'alloc us':>8} {'free us':>7} {'hash us':>7} {'hit':>6}"
    )
    if ref:
        header += f" {'vLLM req/s':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for case, m in mine.items():
        line = (
            f"{case.model:<9} {case.hash_name:<7} {'on' if case.events else 'off':<6} "
            f"{m['requests_per_s']:>7.0f} {m['blocks_per_s']:>9.0f} {m['us_get']:>7.1f} "
            f"{m['us_alloc']:>8.1f} {m['us_free']:>7.1f} {m['us_hash']:>7.1f} "
            f"{m['hit_rate']:>6.1%}"
        )
        if case in ref:
            r = ref[case]
            if abs(r["hit_rate"] - m["hit_rate"]) > 1e-9:
                raise RuntimeError(f"hit rates differ from vLLM's on {case}: the trace diverged")
            ratio = m["requests_per_s"] / r["requests_per_s"]
            line += f" {r['requests_per_s']:>10.0f} {ratio:>5.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shared", type=float, default=0.5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("kvroute", "vllm"), default="kvroute")
    parser.add_argument(
        "--vllm-python",
        help="a Python interpreter with vLLM installed: runs the same trace on vLLM's "
        "manager and prints the ratio side by side",
    )
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = parser.parse_args()

    if args.json:
        print(json.dumps([asdict(r) for r in run_backend(args.backend, args)]))
        return
    # This machine's speed drifts by tens of percent over seconds, so the two
    # managers alternate round by round and each reports its median.
    ours: list[Result] = []
    theirs: list[Result] | None = [] if args.vllm_python else None
    rounds = tqdm(range(args.repeats), desc="rounds", unit="round")
    for _ in rounds:
        ours.extend(run_backend(args.backend, args))
        if theirs is not None:
            theirs.extend(run_vllm_subprocess(args.vllm_python, args))
    print_table(ours, theirs, args)


if __name__ == "__main__":
    main()
