"""Scale inputs for docs/scale.md: index memory, event ingest and routing CPU, measured.

1. Memory: a `KVIndex` of R replicas x B blocks each, every block held by H replicas
   (H = 1: no sharing), measured with tracemalloc (and the RSS delta as a check).
   Bytes per unique (hash, group) entry and per (hash, replica) pair. Masks are one
   uint64 word per 64 replicas, so the 1,024-replica rows show the width a
   1,024-engine index pays on every entry.
2. Events: the simulator (`configs/bench.yaml`: 30B-class engines, 10,000 prefill
   tokens/s, 64,000 blocks of 16 tokens) replays a Mooncake trace; every batch each
   engine publishes is captured. Per engine: events/s and blocks/s over the run and
   per busy second (what a saturated engine produces), and blocks per computed token.
3. Ingest: the captured frames replayed into a fresh router (decode + `Router.apply`)
   on one core: batches/s, events/s, blocks/s (median of --repeats), with decoding
   and applying timed apart frame by frame. Each round also replays the frames
   decoded into event structs without the frame scan (`KVEventDecoder.decode_events`,
   the path before it: `Router.apply` then goes event by event) and through the
   decoder's checked path alone (`decode_checked`), in rotating order, for ratios
   from one run.

Ingest and routing are timed in this thread's CPU time, not wall time: on a machine
shared with other work, wall time measures the neighbours as much as the code.
4. Routing CPU: `Router.prepare` (validate + hash) and `choose` (index lookup +
   kv_aware policy) for the trace's prompts, with 8 and 1,024 registered replicas
   (the captured cache of 8 engines, plus random blocks on the others).
5. Hashing: a prompt's block hashes (`hash_prompt`, from the uint32 tokens `prepare`
   converts when it validates them; the conversion counts in `prepare`), per 16-token block,
   with the router's own function in `tokens` mode (--tokens-hash, default
   xxh64_tokens) and with the seeded functions an engine may share (the bench
   config's, and vLLM's default sha256).
6. Projection to --engines x --blocks (default 1,024 x 1M) from the figures above,
   and the issue-22 targets next to what this run measured.

Run: python -m benchmarks.scale [--quick] [--tokens-hash NAME]
Writes benchmarks/results/scale/scale.md and scale.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvroute.benchmarks.router import ALGO, BLOCK, CONFIG, SEED, stored
from kvroute.benchmarks.sim.config import BenchConfig, load_bench_config
from kvroute.benchmarks.sim.simulator import SimResult, Simulator, engine_registration
from kvroute.benchmarks.sim.traces import load_mooncake
from kvroute.configs import CONFIG_DIR
from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.events.kv_events import BlockRemoved, BlockStored, KVEventBatch, KVEventDecoder
from kvroute.replicas.api import ReplicaLoad
from kvroute.replicas.clock import VirtualClock
from kvroute.replicas.factory import build_engine
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from kvroute.router.core import Router, hash_prompt, prompt_tokens, router_settings
from kvroute.router.index.kv_index import KVIndex
from kvroute.router.policy import make_policy

GIB = 1 << 30
CHUNK = 16_384


@dataclass
class MemoryRow:
    replicas: int
    blocks_per_replica: int
    holders: int
    unique_entries: int
    bytes_per_entry: float
    bytes_per_pair: float
    rss_bytes_per_entry: float


@dataclass
class EngineEvents:
    """What one engine publishes, averaged over the engines of a simulator run."""

    trace: str
    engines: int
    requests: int
    span_s: float
    busy_fraction: float
    batches_per_s: float
    events_per_s: float
    blocks_per_s: float
    blocks_per_busy_s: float
    blocks_per_computed_token: float
    requests_per_s: float
    mean_prompt_tokens: float
    removed_event_share: float
    stored_blocks_per_event: float
    removed_blocks_per_event: float


@dataclass
class IngestRate:
    batches_per_s: float
    events_per_s: float
    blocks_per_s: float
    # Router.apply's share of the same replay, as if decoding were free.
    apply_blocks_per_s: float = 0.0
    decode_us_per_event: float = 0.0
    apply_us_per_event: float = 0.0
    # The same replay decoded by the checked path alone.
    checked_blocks_per_s: float = 0.0
    checked_decode_us_per_event: float = 0.0
    # The same replay decoded into event structs, without the frame scan.
    structs_blocks_per_s: float = 0.0
    structs_decode_us_per_event: float = 0.0
    structs_apply_us_per_event: float = 0.0


@dataclass
class HashCost:
    mode: str
    algo: str
    us_per_block: float


@dataclass
class RequestCost:
    replicas: int
    prepare_us: float
    choose_us: float
    mean_prompt_tokens: float


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(replicas: int, blocks: int, holders: int, seed: int) -> MemoryRow:
    """Index `replicas` x `blocks` (hash, replica) pairs, each hash held by `holders`
    consecutive replicas; bytes the index keeps per entry and per pair."""
    rng = np.random.default_rng(seed)
    index = KVIndex(ALGO, SEED)
    for r in range(replicas):
        index.register(f"r{r}", CONFIG, hash_block_size=BLOCK, hash_algo=ALGO, hash_seed=SEED)
    unique = replicas * blocks // holders
    # Every replica gets blocks, so masks are as wide as all `replicas` bits.
    chunks = max(1, unique // CHUNK, replicas // holders)
    rss_before = rss_bytes()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in tqdm(range(chunks), desc=f"memory {replicas}x{blocks} H={holders}", leave=False):
        size = unique // chunks + (1 if c < unique % chunks else 0)
        # Made inside the traced region: the index keeps the keys, not these ints.
        keys = rng.integers(0, 1 << 63, size, dtype=np.uint64).tolist()
        batch = KVEventBatch(ts=0.0, events=[stored(keys)])
        for j in range(holders):
            index.apply(f"r{(c * holders + j) % replicas}", batch)
        del keys, batch
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss = rss_bytes() - rss_before
    entries = len(index)
    pairs = sum(index.replica_block_count(f"r{r}") for r in range(replicas))
    return MemoryRow(
        replicas=replicas,
        blocks_per_replica=blocks,
        holders=holders,
        unique_entries=entries,
        bytes_per_entry=(after - before) / entries,
        bytes_per_pair=(after - before) / pairs,
        rss_bytes_per_entry=rss / entries,
    )


def capture(
    config: BenchConfig, trace: str, limit: int, speed: float
) -> tuple[SimResult, list[tuple[str, bytes]]]:
    """Run the simulator on the trace; every (engine, encoded batch) it published."""
    workload = load_mooncake(trace, speed=speed, limit=limit)
    sim = Simulator(config.sim_config("kv_aware"), workload)
    frames: list[tuple[str, bytes]] = []
    for replica_id, stream in sim.publishers.items():
        publish = stream.publish

        def recording(payload: bytes, rid: str = replica_id, inner: Any = publish) -> None:
            frames.append((rid, payload))
            inner(payload)

        stream.publish = recording  # type: ignore[method-assign]
    return sim.run(progress=True), frames


def engine_events(result: SimResult, frames: list[tuple[str, bytes]], trace: str) -> EngineEvents:
    decoder = KVEventDecoder()
    events = {BlockStored: 0, BlockRemoved: 0}
    blocks = {BlockStored: 0, BlockRemoved: 0}
    for _, payload in frames:
        for event in decoder.decode(payload).events:
            kind = type(event)
            if kind in events:
                events[kind] += 1
                blocks[kind] += len(event.block_hashes)
    total_events, total_blocks = sum(events.values()), sum(blocks.values())
    records = result.records
    engines = len(result.replicas)
    span = max(r.finish_s for r in records) - min(r.arrival_s for r in records)
    busy = sum(rep.busy_s for rep in result.replicas.values())
    computed = sum(r.prompt_tokens - r.cached_tokens + r.output_tokens for r in records)
    return EngineEvents(
        trace=trace,
        engines=engines,
        requests=len(records),
        span_s=span,
        busy_fraction=busy / (span * engines),
        batches_per_s=len(frames) / span / engines,
        events_per_s=total_events / span / engines,
        blocks_per_s=total_blocks / span / engines,
        blocks_per_busy_s=total_blocks / busy,
        blocks_per_computed_token=total_blocks / computed,
        requests_per_s=len(records) / span / engines,
        mean_prompt_tokens=statistics.mean(r.prompt_tokens for r in records),
        removed_event_share=events[BlockRemoved] / total_events,
        stored_blocks_per_event=blocks[BlockStored] / max(1, events[BlockStored]),
        removed_blocks_per_event=blocks[BlockRemoved] / max(1, events[BlockRemoved]),
    )


def fresh_router(config: BenchConfig, replicas: int) -> Router:
    """A router core as the simulator builds it, with `replicas` engines registered."""
    settings = config.replica_settings()
    engine = build_engine(settings, VirtualClock())
    router = Router(
        router_settings(config.router, settings.hashing, settings.model, replicas),
        make_policy(config.router.policy, **config.router.policy_options),
    )
    for r in range(replicas):
        router.register(engine_registration(f"r{r}", engine, settings))
        router.report_load(f"r{r}", ReplicaLoad())
    return router


def replay(
    config: BenchConfig, frames: list[tuple[str, bytes]], decode: Callable[[bytes], KVEventBatch]
) -> tuple[float, float]:
    """(decode, apply) thread CPU seconds for every frame into a fresh router, each
    frame decoded and applied in turn, as a router's event loop does."""
    router = fresh_router(config, len({rid for rid, _ in frames}))
    clock = time.thread_time
    decoding = applying = 0.0
    for rid, payload in frames:
        t0 = clock()
        batch = decode(payload)
        t1 = clock()
        router.apply(rid, batch)
        t2 = clock()
        decoding += t1 - t0
        applying += t2 - t1
    return decoding, applying


def ingest_rate(config: BenchConfig, frames: list[tuple[str, bytes]], repeats: int) -> IngestRate:
    """Decode + apply of every captured frame into a fresh router, on this core, with
    the decoder's default path (the frame scan), into event structs without it, and
    with its checked path alone, in rotating order."""
    decoder = KVEventDecoder()
    events = blocks = 0
    for _, payload in frames:
        for event in decoder.decode(payload).events:
            events += 1
            blocks += len(getattr(event, "block_hashes", ()))
    paths = {
        "fast": decoder.decode,
        "structs": decoder.decode_events,
        "checked": decoder.decode_checked,
    }
    names = list(paths)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for round_ in tqdm(range(repeats), desc="ingest", leave=False):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            runs[name].append(replay(config, frames, paths[name]))
    decoding = statistics.median(d for d, _ in runs["fast"])
    applying = statistics.median(a for _, a in runs["fast"])
    elapsed = statistics.median(d + a for d, a in runs["fast"])
    return IngestRate(
        len(frames) / elapsed,
        events / elapsed,
        blocks / elapsed,
        apply_blocks_per_s=blocks / applying,
        decode_us_per_event=1e6 * decoding / events,
        apply_us_per_event=1e6 * applying / events,
        checked_blocks_per_s=blocks / statistics.median(d + a for d, a in runs["checked"]),
        checked_decode_us_per_event=1e6 * statistics.median(d for d, _ in runs["checked"]) / events,
        structs_blocks_per_s=blocks / statistics.median(d + a for d, a in runs["structs"]),
        structs_decode_us_per_event=1e6 * statistics.median(d for d, _ in runs["structs"]) / events,
        structs_apply_us_per_event=1e6 * statistics.median(a for _, a in runs["structs"]) / events,
    )


def request_cost(
    config: BenchConfig,
    result: SimResult,
    frames: list[tuple[str, bytes]],
    replicas: int,
    prompts: list[list[int]],
    filler_blocks: int,
) -> RequestCost:
    """prepare and choose per request, the index holding the simulated engines' caches
    (r0..r7) and, on every other replica, `filler_blocks` random blocks."""
    router = fresh_router(config, replicas)
    decoder = KVEventDecoder()
    for rid, payload in frames:
        router.apply(rid, decoder.decode(payload))
    engines = len(result.replicas)
    rng = random.Random(0)
    for r in range(engines, replicas):
        hashes = [rng.getrandbits(64) for _ in range(filler_blocks)]
        router.apply(f"r{r}", KVEventBatch(ts=0.0, events=[stored(hashes)]))
    prepare_times, choose_times = [], []
    for tokens in tqdm(prompts, desc=f"requests x {replicas} replicas", leave=False):
        t0 = time.thread_time()
        prepared = router.prepare(PromptKeys(tuple(tokens)), 1)
        t1 = time.thread_time()
        decision = router.choose(prepared)
        t2 = time.thread_time()
        router.finish(decision, prepared.num_tokens, decision.predicted_hit_tokens)
        prepare_times.append(t1 - t0)
        choose_times.append(t2 - t1)
    return RequestCost(
        replicas=replicas,
        prepare_us=1e6 * statistics.median(prepare_times),
        choose_us=1e6 * statistics.median(choose_times),
        mean_prompt_tokens=statistics.mean(len(p) for p in prompts),
    )


def hash_costs(prompts: list[list[int]], modes: list[tuple[str, str]]) -> list[HashCost]:
    """Median thread CPU time per 16-token block to hash each prompt, per function,
    as `Router.prepare` does: from the uint32 tokens its validation made (that
    conversion is timed in `prepare`'s row, not here)."""
    costs = []
    for mode, algo in modes:
        fn = get_hash_fn_by_name(algo)
        hasher = RequestBlockHasher(BLOCK, fn, BlockHash(fn(SEED)))
        per_block = []
        for tokens in prompts:
            keys = PromptKeys(tuple(tokens))
            packed = prompt_tokens(keys.token_ids)
            started = time.thread_time()
            hash_prompt(hasher, keys, packed)
            per_block.append((time.thread_time() - started) / (len(tokens) // BLOCK))
        costs.append(HashCost(mode, algo, 1e6 * statistics.median(per_block)))
    return costs


def targets(
    memory: list[MemoryRow], ingest: IngestRate, costs: list[RequestCost], hashing: list[HashCost]
) -> list[tuple[str, str, str, bool]]:
    """(target, measured, goal, met) for each routing-cost target of issue 22."""
    tokens = next(h for h in hashing if h.mode == "tokens")
    wide = max(costs, key=lambda c: c.replicas)
    entry = max((m for m in memory if m.holders == 1), key=lambda m: m.replicas)
    return [
        (
            f"hashing, tokens mode ({tokens.algo})",
            f"{tokens.us_per_block:.3f} us/block",
            "<= 0.2 us/block",
            tokens.us_per_block <= 0.2,
        ),
        (
            f"choose at {wide.replicas:,} replicas",
            f"{wide.choose_us / 1000:.2f} ms",
            "<= 0.3 ms",
            wide.choose_us <= 300,
        ),
        (
            "ingest on one core (decode + apply)",
            f"{ingest.blocks_per_s / 1e6:.2f}M blocks/s",
            ">= 5M blocks/s",
            ingest.blocks_per_s >= 5e6,
        ),
        (
            "ingest on one core, Router.apply's share",
            f"{ingest.apply_blocks_per_s / 1e6:.2f}M blocks/s",
            ">= 5M blocks/s",
            ingest.apply_blocks_per_s >= 5e6,
        ),
        (
            f"index memory at {entry.replicas:,} replicas (H=1)",
            f"{entry.bytes_per_entry:.1f} B/entry",
            "<= 40 B/entry",
            entry.bytes_per_entry <= 40,
        ),
    ]


def projection(
    engines: int,
    blocks: int,
    memory: list[MemoryRow],
    events: EngineEvents,
    ingest: IngestRate,
    costs: list[RequestCost],
) -> dict[str, Any]:
    """The figures docs/scale.md quotes for `engines` x `blocks`, from the measured inputs."""
    wide = [m for m in memory if m.replicas >= 1024]
    narrow = [m for m in memory if m.replicas < 1024]
    per_entry = {m.holders: m.bytes_per_entry for m in wide} or {
        m.holders: m.bytes_per_entry for m in narrow
    }
    pairs = engines * blocks
    index_gib = {f"H={h}": pairs / h * b / GIB for h, b in sorted(per_entry.items())}
    fit = {
        f"H={h}, {cap} GiB": cap * GIB / b * h / engines
        for h, b in sorted(per_entry.items())
        for cap in (64, 256)
    }
    busy = events.blocks_per_busy_s * engines
    average = events.blocks_per_s * engines
    cost = max(costs, key=lambda c: c.replicas)
    rate = events.requests_per_s * engines
    return {
        "engines": engines,
        "blocks_per_engine": blocks,
        "index_gib_per_router": index_gib,
        "max_blocks_per_engine_that_fit": fit,
        "ingest_blocks_per_s_saturated": busy,
        "ingest_cores_saturated": busy / ingest.blocks_per_s,
        "ingest_blocks_per_s_trace_load": average,
        "ingest_cores_trace_load": average / ingest.blocks_per_s,
        "requests_per_s": rate,
        "routing_cpu_us_per_request": cost.prepare_us + cost.choose_us,
        "routing_cores": rate * (cost.prepare_us + cost.choose_us) / 1e6,
    }


def render(
    args: argparse.Namespace,
    memory: list[MemoryRow],
    events: EngineEvents,
    ingest: IngestRate,
    costs: list[RequestCost],
    hashing: list[HashCost],
    projected: dict[str, Any],
) -> str:
    lines = [
        "## Issue 22 targets (this run)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
        *(
            f"| {name} | {measured} | {goal} | {'yes' if met else 'no'} |"
            for name, measured, goal, met in targets(memory, ingest, costs, hashing)
        ),
        "",
        "## Hashing a prompt (trace prompts, median thread CPU time per 16-token block)",
        "",
        "| mode | function | us per block |",
        "|---|---|---|",
        *(f"| {h.mode} | {h.algo} | {h.us_per_block:.3f} |" for h in hashing),
        "",
        "## Index memory (tracemalloc; RSS delta as a check)",
        "",
        "| replicas | blocks each | holders per hash | unique entries | B/entry "
        "| B/(hash, replica) "
        "| RSS B/entry |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {m.replicas} | {m.blocks_per_replica:,} | {m.holders} | {m.unique_entries:,} | "
            f"{m.bytes_per_entry:.1f} | {m.bytes_per_pair:.1f} | {m.rss_bytes_per_entry:.1f} |"
            for m in memory
        ),
        "",
        f"## Events one engine publishes (simulator, {events.trace} trace, first "
        f"{events.requests} requests at {args.speed:g}x, {events.engines} engines of "
        "configs/bench.yaml)",
        "",
        f"- span {events.span_s:.0f} s, engines busy {events.busy_fraction:.0%} of it; "
        f"{events.requests_per_s:.2f} requests/s per engine, mean prompt "
        f"{events.mean_prompt_tokens:,.0f} tokens",
        f"- per engine: {events.batches_per_s:.1f} batches/s, {events.events_per_s:.1f} "
        f"events/s, {events.blocks_per_s:.0f} blocks/s (stored + removed) over the run; "
        f"{events.blocks_per_busy_s:.0f} blocks per busy second (saturated)",
        f"- {events.blocks_per_computed_token:.4f} blocks per computed token "
        f"(1/{1 / events.blocks_per_computed_token:.1f})",
        f"- {events.removed_event_share:.1%} of events are BlockRemoved; blocks per event: "
        f"{events.stored_blocks_per_event:.1f} stored, {events.removed_blocks_per_event:.1f} "
        "removed",
        "",
        "## Ingest on one core (decode + Router.apply of the captured frames, CPU time)",
        "",
        f"- {ingest.batches_per_s:,.0f} batches/s, {ingest.events_per_s:,.0f} events/s, "
        f"{ingest.blocks_per_s:,.0f} blocks/s (median of {args.repeats})",
        f"- of which decoding {ingest.decode_us_per_event:.2f} us/event and Router.apply "
        f"{ingest.apply_us_per_event:.2f} us/event; apply's share alone: "
        f"{ingest.apply_blocks_per_s:,.0f} blocks/s",
        f"- decoded into event structs without the frame scan (in rotating rounds): "
        f"{ingest.structs_blocks_per_s:,.0f} blocks/s, decoding "
        f"{ingest.structs_decode_us_per_event:.2f} us/event, Router.apply "
        f"{ingest.structs_apply_us_per_event:.2f} us/event",
        f"- decoded by the checked path alone (in rotating rounds): "
        f"{ingest.checked_blocks_per_s:,.0f} blocks/s, decoding "
        f"{ingest.checked_decode_us_per_event:.2f} us/event",
        "",
        "## Routing CPU per request (trace prompts, median thread CPU time)",
        "",
        "| replicas | prepare us | choose us | total us | mean prompt tokens |",
        "|---|---|---|---|---|",
        *(
            f"| {c.replicas} | {c.prepare_us:.0f} | {c.choose_us:.0f} | "
            f"{c.prepare_us + c.choose_us:.0f} | {c.mean_prompt_tokens:,.0f} |"
            for c in costs
        ),
        "",
        f"## Projection: {projected['engines']:,} engines x {projected['blocks_per_engine']:,} "
        "blocks",
        "",
        *(
            f"- full index per router, {k}: {v:,.0f} GiB"
            for k, v in projected["index_gib_per_router"].items()
        ),
        *(
            f"- blocks per engine that fit, {k}: {v:,.0f}"
            for k, v in projected["max_blocks_per_engine_that_fit"].items()
        ),
        f"- ingest per router, engines saturated: {projected['ingest_blocks_per_s_saturated']:,.0f}"
        f" blocks/s = {projected['ingest_cores_saturated']:.2f} cores",
        f"- ingest per router at the trace's load: "
        f"{projected['ingest_blocks_per_s_trace_load']:,.0f} blocks/s = "
        f"{projected['ingest_cores_trace_load']:.2f} cores",
        f"- routing at the trace's request rate ({projected['requests_per_s']:,.0f} req/s): "
        f"{projected['routing_cpu_us_per_request']:.0f} us each = "
        f"{projected['routing_cores']:.2f} cores",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--trace", default="conversation")
    parser.add_argument("--limit", type=int, default=2000, help="trace requests to simulate")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=300, help="requests timed for CPU")
    parser.add_argument("--engines", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    parser.add_argument(
        "--tokens-hash",
        default="xxh64_tokens",
        help="the router's own hash function in tokens mode (xxhash on code without it)",
    )
    args = parser.parse_args()
    shapes = [(64, 100_000, 1), (64, 100_000, 4), (1024, 4_000, 1), (1024, 4_000, 4)]
    filler = 2_000
    if args.quick:
        shapes = [(64, 5_000, 1), (1024, 500, 1)]
        args.limit, args.repeats, args.prompts, filler = 200, 1, 50, 100
    config = load_bench_config(CONFIG_DIR / "bench.yaml")
    load_before = os.getloadavg()
    started = time.perf_counter()

    memory = [measure_memory(r, b, h, seed=i) for i, (r, b, h) in enumerate(shapes)]
    result, frames = capture(config, args.trace, args.limit, args.speed)
    events = engine_events(result, frames, args.trace)
    ingest = ingest_rate(config, frames, args.repeats)
    workload = load_mooncake(args.trace, speed=args.speed, limit=args.limit)
    step = max(1, len(workload.requests) // args.prompts)
    prompts = [request.token_ids() for request in workload.requests[::step][: args.prompts]]
    costs = [request_cost(config, result, frames, n, prompts, filler) for n in (8, 1024)]
    hashing = hash_costs(
        prompts,
        [("tokens", args.tokens_hash), ("seeded", config.hashing.algo), ("seeded", "sha256")],
    )
    projected = projection(args.engines, args.blocks, memory, events, ingest, costs)

    command = "python -m benchmarks.scale" + (" --quick" if args.quick else "")
    if args.tokens_hash != "xxh64_tokens":
        command += f" --tokens-hash {args.tokens_hash}"
    note = (
        f"`{command}`: {os.cpu_count()} cores shared with other work, load average "
        f"{load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
        f"{time.perf_counter() - started:.0f} s."
    )
    text = render(args, memory, events, ingest, costs, hashing, projected)
    print(f"\n{note}\n\n{text}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(f"# Scale inputs\n\n{note}\n\n{text}\n")
    payload = {
        "command": command,
        "memory": [asdict(m) for m in memory],
        "engine_events": asdict(events),
        "ingest": asdict(ingest),
        "request_cost": [asdict(c) for c in costs],
        "hashing": [asdict(h) for h in hashing],
        "projection": projected,
    }
    (args.out / "scale.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
