"""Ingest of scanned batches (op arrays, one kernel call per group) leaves the index
exactly as the event-by-event path does: the same entries and holders in every
table, the same predictions, second copies and counters, over random streams
(a block removed and stored again in one batch, second copies, clears mid-batch,
hybrid replicas, unknown and mismatched groups, predictions, wide and shared
entries) and over malformed frames."""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from kvroute.events.errors import MalformedInputError
from kvroute.events.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecoder,
    encode_batch,
)
from kvroute.events.scan import ScannedEvents
from kvroute.router.index.block_table import BlockTable, mask_ints
from kvroute.router.index.kv_index import KVIndex
from tests.events.test_fuzz import mutate
from tests.replicas.conftest import config, full, swa

ALGO, SEED = "sha256", "seed"
DECODER = KVEventDecoder()
# Replica names with their group layouts: one full-attention group, or a hybrid.
LAYOUTS = {"plain": (full(4),), "hybrid": (full(4), swa(4, 8))}


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def index_of(replicas: int) -> KVIndex:
    """Replicas r0.. alternating plain and hybrid layouts."""
    index = KVIndex(ALGO, SEED, clock=Clock())
    for r in range(replicas):
        specs = LAYOUTS["plain" if r % 2 == 0 else "hybrid"]
        index.register(
            f"r{r}", config(64, *specs), hash_block_size=4, hash_algo=ALGO, hash_seed=SEED
        )
    return index


def table_state(table: BlockTable) -> dict[int, int]:
    """Each key of the table and the replica bits holding it."""
    keys = np.sort(table._keys[: len(table)])
    out = np.zeros((keys.size, max(1, table.width)), np.uint64)
    table.lookup_into(keys, out)
    return dict(zip(keys.tolist(), mask_ints(out), strict=True))


def state(index: KVIndex) -> dict[str, Any]:
    ingest = index._ingest
    stats = asdict(index.stats)
    stats.pop("dropped_kinds")
    return {
        "confirmed": [table_state(t) for t in index._groups],
        "predicted": [table_state(t) for t in index._predictions.tables],
        "copies": ingest._extra_copies,
        "stats": stats,
    }


def random_batch(rng: random.Random, held: dict[str, list[int]], name: str) -> KVEventBatch:
    """A batch of mostly single-block removals of blocks the replica holds, some
    stores of new and of held blocks (second copies), now and then a removal of an
    unknown block, a clear, an untagged or unknown-group event, or a BlockStored of
    the wrong block size or spec kind."""
    blocks = held[name]
    events: list[Any] = []
    for _ in range(rng.randint(0, 12)):
        roll = rng.random()
        group = rng.choice([0, 0, 0, 1, None])
        if roll < 0.55 and blocks:
            events.append(BlockRemoved([rng.choice(blocks)], "GPU", group))
        elif roll < 0.8:
            fresh = [rng.randrange(1, 200) for _ in range(rng.randint(0, 5))]
            again = rng.sample(blocks, min(len(blocks), rng.randint(0, 2)))
            keys = fresh + again
            blocks.extend(fresh)
            size = 4 if rng.random() < 0.95 else 8
            kind = rng.choice([None, "full_attention", "full_attention", "sliding_window"])
            events.append(
                BlockStored(
                    keys,
                    None,
                    [1] * 4 * len(keys),
                    size,
                    None,
                    "GPU",
                    None,
                    extra_keys=[None] * len(keys),
                    group_idx=group,
                    kv_cache_spec_kind=kind,
                )
            )
        elif roll < 0.9:
            hashes: list[int | bytes] = [rng.randrange(1, 200), rng.randbytes(rng.randint(1, 12))]
            events.append(BlockRemoved(hashes, None, group if rng.random() < 0.9 else 7))
        elif roll < 0.95:
            events.append(AllBlocksCleared())
            blocks.clear()
        else:
            events.append(BlockRemoved([rng.randrange(1, 200)], "GPU", None))
    return KVEventBatch(ts=float(rng.randint(0, 9)), events=events)


def apply_both(
    scanned: KVIndex, reference: KVIndex, name: str, payload: bytes
) -> tuple[bool, bool]:
    """Apply a payload decoded with the scan and without it; (decoded, scanned)."""
    try:
        batch = DECODER.decode(payload)
    except MalformedInputError as exc:
        with pytest.raises(MalformedInputError) as info:
            DECODER.decode_events(payload)
        assert info.value.kind is exc.kind
        return False, False
    scanned.apply(name, batch)
    reference.apply(name, DECODER.decode_events(payload))
    return True, type(batch.events) is ScannedEvents


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_leave_the_index_as_the_event_path_does(seed: int) -> None:
    rng = random.Random(seed)
    replicas = 70 if seed % 2 else 6  # past 64 bits, masks are two words wide
    scanned, reference = index_of(replicas), index_of(replicas)
    held: dict[str, list[int]] = {f"r{r}": [] for r in range(replicas)}
    for r in range(0, replicas, 3):  # predictions that events settle, or not
        keys = np.array([rng.randrange(1, 200) for _ in range(6)], np.uint64)
        for index in (scanned, reference):
            index.add_peer_prediction(f"r{r}", 4, keys)
    took_scan = 0
    for _ in range(400):
        name = f"r{rng.randrange(replicas)}"
        payload = encode_batch(random_batch(rng, held, name))
        decoded, via_scan = apply_both(scanned, reference, name, payload)
        assert decoded
        took_scan += via_scan
        assert state(scanned) == state(reference)
    assert took_scan > 300
    assert scanned.stats.predictions_confirmed > 0 and scanned.stats.unknown_group > 0
    assert scanned._ingest._extra_copies and scanned.stats.cleared > 0


def test_keys_held_by_many_replicas_spill_and_return_alike() -> None:
    """Every replica stores the same blocks (holders past the inline four spill to
    mask rows, which grow mid-kernel), then removes them, then stores them twice."""
    scanned, reference = index_of(12), index_of(12)
    blocks = list(range(1, 120))
    for step in ("store", "remove", "store", "store"):
        for r in range(12):
            event: Any = (
                BlockStored(blocks, None, [], 4, None, None, None, group_idx=0)
                if step == "store"
                else BlockRemoved(blocks, None, 0)
            )
            payload = encode_batch(KVEventBatch(ts=0.0, events=[event, BlockRemoved([3], None, 0)]))
            assert apply_both(scanned, reference, f"r{r}", payload) == (True, True)
            assert state(scanned) == state(reference)
    assert len(scanned._ingest._extra_copies) == 12


def test_a_block_removed_and_stored_again_in_one_batch_stays_held() -> None:
    scanned = index_of(1)
    first = KVEventBatch(ts=0.0, events=[BlockStored([5, 6], None, [], 4, None, None, None)])
    again = KVEventBatch(
        ts=0.0,
        events=[
            BlockRemoved([5], None),
            BlockStored([5], None, [], 4, None, None, None),
            BlockRemoved([6], None),
        ],
    )
    for batch in (first, again):
        decoded = DECODER.decode(encode_batch(batch))
        assert type(decoded.events) is ScannedEvents
        scanned.apply("r0", decoded)
    assert table_state(scanned._groups[0]) == {5: 1}
    assert scanned.stats.stored_blocks == 3 and scanned.stats.removed_blocks == 2


@pytest.mark.parametrize("seed", range(3))
def test_malformed_and_mutated_frames_are_refused_or_applied_alike(seed: int) -> None:
    rng = random.Random(seed)
    scanned, reference = index_of(4), index_of(4)
    held: dict[str, list[int]] = {f"r{r}": [] for r in range(4)}
    outcomes = {True: 0, False: 0}
    for _ in range(300):
        name = f"r{rng.randrange(4)}"
        payload = mutate(encode_batch(random_batch(rng, held, name)), rng)
        decoded, _ = apply_both(scanned, reference, name, payload)
        outcomes[decoded] += 1
        assert state(scanned) == state(reference)
    assert outcomes[True] > 10 and outcomes[False] > 100


def test_a_replica_on_a_reused_bit_is_read_with_its_own_groups() -> None:
    index = index_of(1)
    payload = encode_batch(
        KVEventBatch(ts=0.0, events=[BlockStored([9], None, [], 4, None, None, None, group_idx=1)])
    )
    index.apply("r0", DECODER.decode(payload))  # r0 has one group: refused
    index.remove("r0")
    index.register(
        "h", config(64, *LAYOUTS["hybrid"]), hash_block_size=4, hash_algo=ALGO, hash_seed=SEED
    )
    assert index.replica("h").bit == 0
    index.apply("h", DECODER.decode(payload))
    assert table_state(index._groups[1]) == {9: 1}
    assert index.stats.unknown_group == 1 and index.stats.stored_blocks == 1
