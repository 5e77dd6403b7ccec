"""Behaviour that must match vLLM's events module and publisher."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from kvroute.events.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecoder,
    without_token_ids,
)
from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from tests.events.helpers import WAIT_S

pytestmark = pytest.mark.timeout(60)


def stored(**changes: object) -> BlockStored:
    fields: dict[str, object] = {
        "block_hashes": [1, 2],
        "parent_block_hash": 9,
        "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [("salt",), None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
        "kv_cache_spec_sliding_window": None,
    }
    fields.update(changes)
    return BlockStored(**fields)  # type: ignore[arg-type]


def test_equal_events_hash_equally_and_work_as_dict_keys() -> None:
    counts = {stored(): 1, BlockRemoved([1], "GPU", 0): 2, AllBlocksCleared(): 3}
    assert counts[stored()] == 1
    assert counts[BlockRemoved([1], "GPU", 0)] == 2
    assert counts[AllBlocksCleared()] == 3


@pytest.mark.parametrize(
    "changes",
    [
        {"group_idx": 1},
        {"block_hashes": [1, 3]},
        {"token_ids": [1, 2, 3, 4, 5, 6, 7, 9]},
        {"lora_id": 7, "lora_name": "adapter"},
        {"medium": "CPU"},
        {"extra_keys": [("other-salt",), None]},
        {"kv_cache_spec_kind": "sliding_window", "kv_cache_spec_sliding_window": 64},
    ],
)
def test_block_stored_events_differing_in_one_field_hash_differently(
    changes: dict[str, object],
) -> None:
    assert hash(stored(**changes)) != hash(stored())


def test_block_removed_hash_covers_group_hashes_and_medium() -> None:
    base = hash(BlockRemoved([1], "GPU", 0))
    assert base != hash(BlockRemoved([1], "GPU", 1))
    assert base != hash(BlockRemoved([2], "GPU", 0))
    assert base != hash(BlockRemoved([1], "CPU", 0))


def test_a_decoded_event_hashes_like_the_one_encoded() -> None:
    batch = KVEventBatch(ts=1.0, events=[stored()])
    decoded = KVEventDecoder().decode(msgspec.msgpack.encode(batch))
    assert hash(decoded.events[0]) == hash(stored())


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def received_ranks(ctx: zmq.Context, rank: int, batch: KVEventBatch) -> list[int | None]:
    """The ranks carried by the first two copies of `batch` that a subscriber receives
    from a publisher of data-parallel rank `rank` (a SUB joins late, so the publisher
    repeats the batch until two have arrived)."""
    publisher = ZmqEventPublisher(
        PublisherConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint=None, data_parallel_rank=rank)
    )
    publisher.start()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    sub.connect(publisher.endpoint)
    decoder = KVEventDecoder()
    seen: list[int | None] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while len(seen) < 2 and time.monotonic() < deadline:
            publisher.publish(batch)
            if sub.poll(20):
                seen.append(decoder.decode(sub.recv_multipart()[2]).data_parallel_rank)
    finally:
        sub.close(linger=0)
        publisher.close()
    return seen


def test_publisher_fills_its_rank_into_a_batch_without_one(ctx: zmq.Context) -> None:
    assert received_ranks(ctx, 3, KVEventBatch(ts=1.0, events=[])) == [3, 3]


def test_publisher_keeps_a_rank_the_batch_already_has(ctx: zmq.Context) -> None:
    batch = KVEventBatch(ts=1.0, events=[], data_parallel_rank=1)
    assert received_ranks(ctx, 3, batch) == [1, 1]


def test_without_token_ids_empties_only_block_stored_tokens() -> None:
    batch = KVEventBatch(ts=2.0, events=[stored(), BlockRemoved([1], "GPU", 0), AllBlocksCleared()])
    stripped = without_token_ids(batch)
    assert stripped.events[0] == stored(token_ids=[])
    assert stripped.events[1:] == batch.events[1:]
    assert batch.events[0].token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    decoded = KVEventDecoder().decode(msgspec.msgpack.encode(stripped))
    assert decoded.events[0].token_ids == []
