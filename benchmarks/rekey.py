"""What an engine that hashes unlike the router costs the router's ingest, per prompt.

A vLLM engine draws its hash seed at random unless PYTHONHASHSEED is set, so the
router registers it in tokens mode: every BlockStored is re-keyed from its token ids
(`router/index/rekey.py`), and every BlockRemoved is mapped back to the router's keys.
An engine hashed like the router (seeded mode) needs neither. This builds the events
of `--prompts` new prompts of `--blocks` 16-token blocks as an engine publishes them
(one BlockStored per prompt; its evictions later, one BlockRemoved per block), decodes
them once, and times `KVIndex.apply` on them in both modes, on this thread's CPU
clock: the best of `--rounds` rounds.

Run: python -m benchmarks.rekey [--prompts 300 --blocks 62 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.events.kv_events import (
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecoder,
    WireEncoding,
    encode_batch,
)
from kvroute.replicas.kv_cache.specs import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from kvroute.replicas.kv_cache.utils import BlockHash, hash_block_tokens, init_none_hash
from kvroute.router.app.precompile import precompile
from kvroute.router.index.ingest import event_hash
from kvroute.router.index.kv_index import KVIndex

BLOCK = 16
ALGO, SEED = "sha256", "engine-seed"
MODES = ("seeded", "tokens")


def _prompt_events(serial: int, blocks: int) -> tuple[KVEventBatch, KVEventBatch]:
    """One new prompt's BlockStored, and its blocks' evictions, as the engine hashes."""
    hash_fn = get_hash_fn_by_name(ALGO)
    parent = init_none_hash(hash_fn, SEED)
    keys: list[int] = []
    tokens: list[int] = []
    for block in range(blocks):
        ids = [(serial * 7_919 + block * BLOCK + t) % 32_000 for t in range(BLOCK)]
        parent = hash_block_tokens(hash_fn, BlockHash(parent), ids, None)
        keys.append(event_hash(parent))
        tokens += ids
    stored = KVEventBatch(0.0, [BlockStored(keys, None, tokens, BLOCK, None, None, None)])
    removed = KVEventBatch(0.0, [BlockRemoved([key], None) for key in keys])
    return stored, removed


def _index(mode: str, num_blocks: int) -> KVIndex:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    config = KVCacheConfig(num_blocks, kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    index = KVIndex("xxh64_tokens", "router-seed") if mode == "tokens" else KVIndex(ALGO, SEED)
    seeded = {"hash_algo": ALGO, "hash_seed": SEED} if mode == "seeded" else {}
    index.register("engine", config, hash_block_size=BLOCK, hash_mode=mode, **seeded)
    return index


def _apply_all(index: KVIndex, batches: list[KVEventBatch]) -> float:
    """Thread CPU seconds to apply every batch."""
    started = time.thread_time()
    for batch in batches:
        index.apply("engine", batch)
    return time.thread_time() - started


def measure(prompts: int, blocks: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per mode, the best round's (store, removals) seconds per prompt."""
    precompile()
    frames = [
        tuple(encode_batch(batch, WireEncoding.ARRAY) for batch in _prompt_events(i, blocks))
        for i in range(prompts)
    ]
    decoder = KVEventDecoder()
    best = {mode: (float("inf"), float("inf")) for mode in MODES}
    with tqdm(total=rounds * len(MODES), desc="rounds", unit="round") as bar:
        for _ in range(rounds):
            for mode in MODES:
                index = _index(mode, prompts * blocks)
                stored = [decoder.decode(frame[0]) for frame in frames]
                removed = [decoder.decode(frame[1]) for frame in frames]
                store = _apply_all(index, stored) / prompts
                remove = _apply_all(index, removed) / prompts
                assert len(index) == 0, "every stored block was removed again"
                best[mode] = (min(best[mode][0], store), min(best[mode][1], remove))
                bar.update()
    return best


def table(best: dict[str, tuple[float, float]], blocks: int) -> str:
    lines = [
        "| mode | store us / prompt | removals us / prompt | us / block (both) |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        store, remove = best[mode]
        per_block = (store + remove) / blocks
        lines.append(f"| {mode} | {store * 1e6:.1f} | {remove * 1e6:.1f} | {per_block * 1e6:.2f} |")
    ratio = sum(best["tokens"]) / sum(best["seeded"])
    lines.append(f"| tokens / seeded | | | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=62, help="16-token blocks per prompt")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best = measure(args.prompts, args.blocks, args.rounds)
    print(
        f"`python -m benchmarks.rekey --prompts {args.prompts} --blocks {args.blocks} "
        f"--rounds {args.rounds}`: KVIndex.apply on decoded events, thread CPU, best round\n"
    )
    print(table(best, args.blocks))


if __name__ == "__main__":
    main()
