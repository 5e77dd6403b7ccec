"""KV event stream: typed decode rate and publisher -> subscriber throughput.

1. Decode: 64-event batches through `KVEventDecoder` (every limit checked) on one
   core, as events/s and block hashes/s, beside msgspec's unchecked decode of the
   same bytes, for 1 and 4 blocks per event and both wire encodings. The issue's
   target is 1 M block hashes/s.
2. Stream: 1 and 4 publisher processes over tcp and ipc (loopback only) into one
   subscriber that decodes every batch; events/s and MB/s of payload from the go
   signal to the last delivery, every batch delivered exactly once. Publishers
   are separate processes, as replicas are; on a 2-core machine they compete
   with the subscriber for CPU.

Each figure is the median of --repeats runs; ratios come from the same run.
Run: python -m benchmarks.events [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent

import msgspec
from tqdm import tqdm

from kvroute.events import (
    BlockStored,
    KVEventBatch,
    KVEventDecoder,
    PublisherConfig,
    ResyncReason,
    SourceSpec,
    SubscriberConfig,
    WireEncoding,
    ZmqEventPublisher,
    ZmqEventSubscriber,
    encode_batch,
)

BLOCK_SIZE = 16
EVENTS_PER_BATCH = 64
TARGET_HASHES_PER_S = 1_000_000
DECODE_SECONDS = 0.5  # timed decoding per case and repeat
STREAM_TIMEOUT_S = 60.0  # a stream run that takes longer is reported as failed


def make_batch(blocks_per_event: int, seed: int = 0) -> KVEventBatch:
    """64 BlockStored events shaped like a decode step: random 64-bit hashes, real-size tokens."""
    rng = random.Random(seed)
    events = [
        BlockStored(
            block_hashes=[rng.getrandbits(64) for _ in range(blocks_per_event)],
            parent_block_hash=rng.getrandbits(64),
            token_ids=[rng.randrange(150_000) for _ in range(blocks_per_event * BLOCK_SIZE)],
            block_size=BLOCK_SIZE,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        )
        for _ in range(EVENTS_PER_BATCH)
    ]
    return KVEventBatch(ts=time.time(), events=events, data_parallel_rank=0)


def decode_rate(decode: Callable[[bytes], object], payload: bytes) -> float:
    """Batches decoded per second, timed over about DECODE_SECONDS after a warm-up."""
    for _ in range(200):
        decode(payload)
    count, start = 0, time.perf_counter()
    deadline = start + DECODE_SECONDS
    while time.perf_counter() < deadline:
        for _ in range(100):
            decode(payload)
        count += 100
    return count / (time.perf_counter() - start)


@dataclass(frozen=True)
class DecodeCase:
    blocks_per_event: int
    encoding: WireEncoding


def decode_row(case: DecodeCase, repeats: int, progress: tqdm) -> list[str]:
    payload = encode_batch(make_batch(case.blocks_per_event), case.encoding)
    checked = KVEventDecoder().decode
    unchecked = msgspec.msgpack.Decoder(KVEventBatch).decode
    rates: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for _ in range(repeats):
        rates["checked"].append(decode_rate(checked, payload))
        if case.encoding is WireEncoding.ARRAY:  # msgspec alone cannot read map events
            rates["unchecked"].append(decode_rate(unchecked, payload))
        progress.update()
    batches = statistics.median(rates["checked"])
    hashes = batches * EVENTS_PER_BATCH * case.blocks_per_event
    base = statistics.median(rates["unchecked"]) if rates["unchecked"] else None
    return [
        case.encoding.value,
        str(case.blocks_per_event),
        f"{len(payload):,}",
        f"{batches * EVENTS_PER_BATCH / 1e6:.2f} M",
        f"{hashes / 1e6:.2f} M",
        f"{hashes / TARGET_HASHES_PER_S:.2f}x",
        f"{batches / base:.2f}" if base else "-",
    ]


def publish_process(
    transport: str,
    name: str,
    batches: int,
    endpoints: mp.Queue,
    go: MpEvent,
    done: MpEvent,
) -> None:
    """A replica stand-in: one warm-up batch, then `batches` as fast as it can."""
    config = PublisherConfig(
        endpoint=transport.format(name=f"{name}-pub"),
        replay_endpoint=transport.format(name=f"{name}-replay"),
        max_queue_size=batches + 1,
    )
    payload = encode_batch(make_batch(1, seed=int(name[1:])))
    with ZmqEventPublisher(config) as publisher:
        endpoints.put((name, publisher.endpoint, publisher.replay_endpoint))
        publisher.publish_payload(payload)
        go.wait(STREAM_TIMEOUT_S)
        for _ in range(batches):
            publisher.publish_payload(payload)
        done.wait(STREAM_TIMEOUT_S)  # keep the replay socket up until the subscriber is done


class Counter:
    """Counts deliveries per source and signals when every source has `want` batches."""

    def __init__(self, want: int, sources: int) -> None:
        self.want, self.sources = want, sources
        self.events = self.batches = 0
        self.per_source: dict[str, int] = {}
        self.resyncs: list[tuple[str, ResyncReason]] = []
        self.warm = threading.Event()
        self.complete = threading.Event()

    def on_batch(self, source: str, seq: int, batch: KVEventBatch) -> None:
        count = self.per_source[source] = self.per_source.get(source, 0) + 1
        if seq == 0:
            if len(self.per_source) == self.sources:
                self.warm.set()
            return
        self.events += len(batch.events)
        self.batches += 1
        if count == self.want + 1 and all(n > self.want for n in self.per_source.values()):
            self.complete.set()

    def on_resync(self, source: str, reason: ResyncReason) -> None:
        self.resyncs.append((source, reason))


def stream_run(transport: str, publishers: int, batches: int) -> tuple[float, int, int]:
    """(seconds, events, batches) from go to the last delivery; raises on loss or timeout."""
    ctx = mp.get_context("spawn")
    endpoints: mp.Queue = ctx.Queue()
    go, done = ctx.Event(), ctx.Event()
    names = [f"p{k}" for k in range(publishers)]
    procs = [
        ctx.Process(target=publish_process, args=(transport, n, batches, endpoints, go, done))
        for n in names
    ]
    for proc in procs:
        proc.start()
    counter = Counter(batches, publishers)
    subscriber = ZmqEventSubscriber(counter.on_batch, counter.on_resync, SubscriberConfig())
    subscriber.start()
    try:
        for _ in names:
            name, endpoint, replay = endpoints.get(timeout=STREAM_TIMEOUT_S)
            subscriber.add_source(SourceSpec(name, endpoint, replay))
        if not counter.warm.wait(STREAM_TIMEOUT_S):
            raise RuntimeError("publishers never connected")
        start = time.perf_counter()
        go.set()
        if not counter.complete.wait(STREAM_TIMEOUT_S) or counter.resyncs:
            raise RuntimeError(f"incomplete: {counter.per_source}, resyncs {counter.resyncs}")
        elapsed = time.perf_counter() - start
    finally:
        done.set()
        subscriber.stop()
        for proc in procs:
            proc.join(STREAM_TIMEOUT_S)
    return elapsed, counter.events, counter.batches


def stream_rows(total_batches: int, repeats: int, progress: tqdm) -> list[list[str]]:
    payload_bytes = len(encode_batch(make_batch(1)))
    results: dict[tuple[str, int], float] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvb", dir="/tmp") as ipc_dir:
        transports = {"tcp": "tcp://127.0.0.1:*", "ipc": f"ipc://{ipc_dir}/{{name}}"}
        for publishers in (1, 4):
            for label, transport in transports.items():
                per_publisher = total_batches // publishers
                rates = []
                for _ in range(repeats):
                    seconds, events, batches = stream_run(transport, publishers, per_publisher)
                    rates.append((events / seconds, batches * payload_bytes / seconds / 1e6))
                    progress.update()
                events_per_s = statistics.median(r[0] for r in rates)
                results[(label, publishers)] = events_per_s
                base = results[("tcp", 1)]
                rows.append(
                    [
                        label,
                        str(publishers),
                        f"{per_publisher * publishers * EVENTS_PER_BATCH / 1e6:.2f} M",
                        f"{events_per_s / 1e6:.2f} M",
                        f"{statistics.median(r[1] for r in rates):.0f}",
                        f"{events_per_s / base:.2f}",
                    ]
                )
    return rows


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(c.rjust(w) for c, w in zip(header, widths, strict=True))
    return "\n".join([title, head, line, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, 1/4 of the batches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=32_000, help="per stream run, all sources")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    batches = args.batches // 4 if args.quick else args.batches
    cases = [DecodeCase(b, e) for b in (1, 4) for e in WireEncoding]
    with tqdm(total=repeats * (len(cases) + 4), desc="events benchmark", leave=False) as progress:
        decode = [decode_row(case, repeats, progress) for case in cases]
        stream = stream_rows(batches, repeats, progress)
    print(
        table(
            f"Typed decode of {EVENTS_PER_BATCH}-event batches, one core (median of {repeats})",
            [
                "encoding",
                "blocks/event",
                "bytes",
                "events/s",
                "hashes/s",
                "vs 1M target",
                "vs unchecked",
            ],
            decode,
        )
    )
    print()
    print(
        table(
            f"Publishers -> one decoding subscriber, loopback (median of {repeats})",
            ["transport", "publishers", "events", "events/s", "MB/s", "vs tcp x1"],
            stream,
        )
    )


if __name__ == "__main__":
    main()
