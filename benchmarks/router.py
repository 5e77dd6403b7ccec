"""Router index: decision latency, ingest rate and memory per entry.

1. Decision latency per prompt, split into hashing (the prompt's block hashes)
   and lookup (`KVIndex.predict` over every registered replica), for prompts
   of 1k-32k tokens and 1-1,024 replicas. Every replica holds blocks of its
   own; two of them also hold the first half of the probed prompt, so lookup
   must find those two and skip the rest.
2. Ingest: blocks/s applied to the index from encoded KVEventBatch frames
   (msgpack decode included), on one core.
3. Memory: bytes per indexed (hash, group) entry at 1M entries, measured with
   tracemalloc, for 8 and 1,024 replicas. Blocks are stored by replicas taken
   in turn from the lowest bit, so with 1,024 replicas only the first ~250
   hold any; the "top bits" row takes them from the highest bit instead, so
   masks must be as wide as all 1,024 replicas (the worst case).

Run: python -m benchmarks.router [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc

import msgspec
import torch
from tqdm import tqdm

from kvroute.events.kv_events import BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.specs import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from kvroute.replicas.request import Request, SamplingParams
from kvroute.router.index.kv_index import KVIndex

BLOCK = 16
ALGO, SEED = "xxhash", "bench"
CONFIG = KVCacheConfig(
    num_blocks=1 << 16,
    kv_cache_groups=[
        KVCacheGroupSpec(
            ["full"],
            FullAttentionSpec(
                block_size=BLOCK, num_kv_heads=8, head_size=128, dtype=torch.bfloat16
            ),
        )
    ],
)


def stored(hashes: list[int]) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=[0] * (BLOCK * len(hashes)),
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def build_index(num_replicas: int, blocks_per_replica: int, rng: random.Random) -> KVIndex:
    index = KVIndex(ALGO, SEED)
    for r in range(num_replicas):
        index.register(f"r{r}", CONFIG, hash_block_size=BLOCK, hash_algo=ALGO, hash_seed=SEED)
        own = [rng.getrandbits(64) for _ in range(blocks_per_replica)]
        index.apply(f"r{r}", KVEventBatch(ts=0.0, events=[stored(own)]))
    return index


def make_request(index: KVIndex, tokens: list[int], request_id: str) -> Request:
    return Request(
        request_id, tokens, SamplingParams(max_tokens=1), block_hasher=index.hasher(BLOCK)
    )


def bench_decisions(args: argparse.Namespace, rng: random.Random) -> list[tuple]:
    rows = []
    replica_counts = [1, 8, 64, 1024] if not args.quick else [1, 64]
    lengths = [1024, 4096, 16384, 32768] if not args.quick else [1024, 8192]
    with tqdm(total=len(replica_counts) * len(lengths), desc="decisions", unit="cell") as bar:
        for num_replicas in replica_counts:
            index = build_index(num_replicas, args.blocks_per_replica, rng)
            for length in lengths:
                prompt = [rng.randrange(32_000) for _ in range(length)]
                holder_prompt = make_request(index, prompt[: length // 2], "holder")
                batch = KVEventBatch(
                    ts=0.0,
                    events=[
                        stored([int.from_bytes(h[-8:], "big") for h in holder_prompt.block_hashes])
                    ],
                )
                holders = [f"r{r}" for r in range(min(2, num_replicas))]
                for name in holders:
                    index.apply(name, batch)
                hash_times, lookup_times = [], []
                for i in range(args.samples):
                    probe = [*prompt[:-1], rng.randrange(32_000)]
                    t0 = time.perf_counter()
                    request = make_request(index, probe, f"p{i}")
                    t1 = time.perf_counter()
                    hits = index.predict(request)
                    t2 = time.perf_counter()
                    hash_times.append(t1 - t0)
                    lookup_times.append(t2 - t1)
                expected = (length // 2) // BLOCK * BLOCK
                if [hits[h] for h in holders] != [expected] * len(holders):
                    raise RuntimeError(f"wrong prediction {hits} for {length} tokens")
                blocks = length // BLOCK
                rows.append(
                    (
                        num_replicas,
                        length,
                        1e6 * statistics.median(hash_times) / blocks,
                        1e6 * statistics.median(lookup_times) / blocks,
                        1e6 * statistics.median(lookup_times),
                    )
                )
                bar.update()
    return rows


def bench_ingest(args: argparse.Namespace, rng: random.Random) -> tuple[float, int]:
    index = KVIndex(ALGO, SEED)
    for r in range(8):
        index.register(f"r{r}", CONFIG, hash_block_size=BLOCK, hash_algo=ALGO, hash_seed=SEED)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    frames = []
    for b in range(args.ingest_batches):
        hashes = [rng.getrandbits(64) for _ in range(64)]
        frames.append(
            (
                f"r{b % 8}",
                encoder.encode(
                    KVEventBatch(
                        ts=0.0, events=[stored(hashes[i : i + 16]) for i in range(0, 64, 16)]
                    )
                ),
            )
        )
    t0 = time.perf_counter()
    for name, frame in frames:
        index.apply(name, decoder.decode(frame))
    elapsed = time.perf_counter() - t0
    blocks = 64 * len(frames)
    return blocks / elapsed, blocks


def bench_memory(num_replicas: int, entries: int, rng: random.Random, top_bits: bool) -> float:
    index = KVIndex(ALGO, SEED)
    for r in range(num_replicas):
        index.register(f"r{r}", CONFIG, hash_block_size=BLOCK, hash_algo=ALGO, hash_seed=SEED)
    # Outside the traced region: a first call may load compiled code.
    build_index(1, 1, rng)
    chunk = 4096
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, entries, chunk):
        # Hash ints are made inside the traced region: the index keeps them.
        part = [rng.getrandbits(64) for _ in range(min(chunk, entries - start))]
        # Each block is held by one replica, a tenth of them by a second one.
        turn = start // chunk
        if top_bits:
            turn = num_replicas - 2 - turn
        owner = f"r{turn % num_replicas}"
        index.apply(owner, KVEventBatch(ts=0.0, events=[stored(part)]))
        other = f"r{(turn + 1) % num_replicas}"
        index.apply(other, KVEventBatch(ts=0.0, events=[stored(part[: chunk // 10])]))
        del part
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / len(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid for smoke runs")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--blocks-per-replica", type=int, default=2000)
    parser.add_argument("--ingest-batches", type=int, default=20_000)
    parser.add_argument("--memory-entries", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.ingest_batches, args.memory_entries = 5, 2000, 100_000
    rng = random.Random(args.seed)

    rows = bench_decisions(args, rng)
    print(f"\nDecision latency (median of {args.samples}; hash {ALGO}, block {BLOCK} tokens)\n")
    header = (
        f"{'replicas':>8} {'tokens':>7} {'hash us/blk':>11} {'lookup us/blk':>13} {'lookup us':>10}"
    )
    print(header)
    print("-" * len(header))
    for replicas, tokens, hash_us, lookup_us, lookup_total in rows:
        print(
            f"{replicas:>8} {tokens:>7} {hash_us:>11.2f} {lookup_us:>13.3f} {lookup_total:>10.1f}"
        )

    rate, blocks = bench_ingest(args, rng)
    print(f"\nIngest: {rate / 1e6:.2f} M blocks/s ({blocks:,} blocks, 64-block batches, decoded)")

    print(f"\nMemory per (hash, group) entry at {args.memory_entries:,} entries")
    for replicas, top_bits in ((8, False), (1024, False), (1024, True)):
        per_entry = bench_memory(replicas, args.memory_entries, rng, top_bits)
        budget = 64 + replicas / 8
        label = ", top bits" if top_bits else ""
        print(
            f"  {replicas:>5} replicas{label:<10}: {per_entry:6.1f} B/entry "
            f"(target <= {budget:.0f} B)"
        )


if __name__ == "__main__":
    main()
