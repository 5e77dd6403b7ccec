"""KVIndex: registration, event application, separation of tenants, predictions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.specs import KVCacheSpec
from kvroute.replicas.request import (
    LoRARequest,
    MultiModalFeatureSpec,
    MultiModalKwargsItem,
    PlaceholderRange,
    Request,
    SamplingParams,
)
from kvroute.router.index.kv_index import KVIndex, event_hash
from tests.replicas.conftest import config, full, swa

ALGO, SEED = "sha256", "seed"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _index(*replicas: str, clock: FakeClock | None = None, **kwargs: object) -> KVIndex:
    index = KVIndex(ALGO, SEED, clock=clock or FakeClock(), **kwargs)  # type: ignore[arg-type]
    for name in replicas:
        index.register(name, config(64, full(4)), hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    return index


def _request(index: KVIndex, tokens: list[int], request_id: str = "r", **kwargs: object) -> Request:
    return Request(
        request_id,
        tokens,
        SamplingParams(max_tokens=4),
        block_hasher=index.hasher(4),
        **kwargs,  # type: ignore[arg-type]
    )


def _serve(index: KVIndex, name: str, manager: KVCacheManager, req: Request) -> None:
    """Prefill `req` on `manager` and feed its events to the index."""
    assert manager.allocate_slots(req, req.num_tokens) is not None
    index.apply(name, KVEventBatch(ts=0.0, events=manager.take_events()))


def _manager() -> KVCacheManager:
    return KVCacheManager(
        config(64, full(4)), max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )


def _stored(hashes: list[int], group: int | None = 0, **kwargs: object) -> BlockStored:
    fields: dict[str, object] = {
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(range(4 * len(hashes))),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": group,
    }
    fields.update(kwargs)
    return BlockStored(**fields)  # type: ignore[arg-type]


def test_registration_refuses_a_different_hash_function_or_seed() -> None:
    index = _index()
    with pytest.raises(
        ValueError, match=r"hashes blocks with 'sha256_cbor' seed 'seed'.*every lookup would miss"
    ):
        index.register(
            "a", config(8, full(4)), hash_block_size=4, hash_algo="sha256_cbor", hash_seed=SEED
        )
    with pytest.raises(ValueError, match="seed 'other'"):
        index.register(
            "a", config(8, full(4)), hash_block_size=4, hash_algo=ALGO, hash_seed="other"
        )
    assert index.replica_ids == []


def test_registration_refuses_duplicates_and_the_index_a_random_seed() -> None:
    index = _index("a")
    with pytest.raises(ValueError, match="replica 'a' is already registered"):
        index.register("a", config(8, full(4)), hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    with pytest.raises(ValueError, match="fixed hash_seed"):
        KVIndex(ALGO, "")
    with pytest.raises(ValueError, match="unknown hash function 'md5'"):
        KVIndex("md5", SEED)


def test_predict_reports_each_replicas_hit_and_zero_for_the_rest() -> None:
    index = _index("a", "b", "c")
    manager = _manager()
    _serve(index, "b", manager, _request(index, list(range(20))))
    assert index.predict(_request(index, list(range(18)))) == {"a": 0, "b": 16, "c": 0}
    # Never the whole prompt: the last token is always recomputed.
    assert index.predict(_request(index, list(range(16))))["b"] == 12
    assert index.predict(_request(index, [7, *range(1, 20)]))["b"] == 0


def test_cache_salt_and_lora_separate_tenants() -> None:
    index = _index("a")
    manager = _manager()
    _serve(index, "a", manager, _request(index, list(range(20)), cache_salt="tenant-1"))
    _serve(
        index, "a", manager, _request(index, list(range(20)), "l", lora_request=LoRARequest("x", 1))
    )
    assert index.predict(_request(index, list(range(21)), cache_salt="tenant-1"))["a"] == 20
    assert index.predict(_request(index, list(range(21)), cache_salt="tenant-2"))["a"] == 0
    assert index.predict(_request(index, list(range(21))))["a"] == 0
    lora_x = _request(index, list(range(21)), lora_request=LoRARequest("x", 1))
    assert index.predict(lora_x)["a"] == 20
    lora_y = _request(index, list(range(21)), lora_request=LoRARequest("y", 2))
    assert index.predict(lora_y)["a"] == 0


def _image(identifier: str) -> list[MultiModalFeatureSpec]:
    return [
        MultiModalFeatureSpec(
            data=MultiModalKwargsItem.dummy(),
            modality="image",
            identifier=identifier,
            mm_position=PlaceholderRange(offset=6, length=4),
        )
    ]


def test_multimodal_identifiers_separate_same_placeholder_tokens() -> None:
    index = _index("a")
    tokens = [1, 2, 3, 4, 5, 6, -1, -1, -1, -1, 7, 8, 9]
    _serve(index, "a", _manager(), _request(index, tokens, mm_features=_image("cat")))
    assert index.predict(_request(index, tokens, mm_features=_image("cat")))["a"] == 12
    # Block 0 (tokens 0-3) precedes the image and is shared; the rest differ.
    assert index.predict(_request(index, tokens, mm_features=_image("dog")))["a"] == 4


def test_events_of_unknown_replicas_groups_and_bad_hashes_are_counted_and_dropped() -> None:
    index = _index("a")
    index.apply("ghost", KVEventBatch(ts=0.0, events=[_stored([1])]))
    index.apply(
        "a",
        KVEventBatch(
            ts=0.0,
            events=[
                _stored([2], group=3),
                _stored([3], kv_cache_spec_kind="mamba"),
                _stored([4], block_size=8, token_ids=list(range(8))),
                _stored([-5]),
                _stored([1 << 64]),
                BlockRemoved(block_hashes=[6], medium="GPU", group_idx=9),
            ],
        ),
    )
    stats = index.stats
    assert (stats.unknown_replica, stats.unknown_group, stats.mismatched_group, stats.bad_hash) == (
        1,
        2,
        2,
        2,
    )
    assert len(index) == 0


def test_a_malformed_event_inside_a_run_drops_only_that_event() -> None:
    index = _index("a")
    removed = BlockRemoved(block_hashes=[2, 99, -1], medium="GPU", group_idx=0)
    events = [
        _stored([1, 2]),
        _stored([3, -4]),
        _stored([5]),
        _stored([1 << 64, 6]),
        _stored([7.0]),  # type: ignore[list-item]
        _stored([True]),
        BlockRemoved(block_hashes=[2, 99], medium="GPU", group_idx=0),
        removed,
    ]
    index.apply("a", KVEventBatch(ts=0.0, events=events))
    stats = index.stats
    assert (stats.bad_hash, stats.stored_blocks, stats.removed_blocks) == (5, 3, 2)
    assert (stats.removed_unknown, len(index)) == (1, 2)
    assert index.predict(_request(index, list(range(9))))["a"] == 0


def test_a_second_copy_of_a_block_survives_one_removal() -> None:
    index = _index("a")
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([11]), _stored([11])]))
    index.apply(
        "a",
        KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[11], medium="GPU", group_idx=0)]),
    )
    assert index.replica_block_count("a") == 1
    index.apply(
        "a",
        KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[11], medium="GPU", group_idx=0)]),
    )
    assert index.replica_block_count("a") == 0
    index.apply(
        "a",
        KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=[11], medium="GPU", group_idx=0)]),
    )
    assert index.stats.removed_unknown == 1


def test_raw_byte_hashes_are_indexed_by_their_low_64_bits() -> None:
    index = _index("a")
    raw = bytes(range(32))
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([raw])]))
    assert index.replica_block_count("a") == 1
    assert event_hash(raw) == int.from_bytes(raw[-8:], "big")


def test_all_blocks_cleared_and_reset_forget_only_that_replica() -> None:
    index = _index("a", "b")
    batch = KVEventBatch(ts=0.0, events=[_stored([1, 2, 3])])
    index.apply("a", batch)
    index.apply("b", batch)
    index.apply("a", KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
    assert (index.replica_block_count("a"), index.replica_block_count("b")) == (0, 3)
    index.reset("b")
    assert len(index) == 0 and index.replica_ids == ["a", "b"]


def test_removed_replica_frees_its_bit_for_the_next() -> None:
    index = _index("a", "b")
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([1])]))
    index.remove("a")
    with pytest.raises(KeyError, match="unknown replica 'a'"):
        index.reset("a")
    index.register("c", config(8, full(4)), hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    assert index.replica("c").bit == 0
    assert index.replica_block_count("c") == 0


def test_predictions_count_only_when_asked_and_expire_by_ttl() -> None:
    clock = FakeClock()
    index = _index("a", "b", clock=clock, prediction_ttl_s=2.0)
    prompt = list(range(21))
    assert index.add_prediction("b", _request(index, prompt)) == 5
    probe = _request(index, prompt)
    assert index.predict(probe) == {"a": 0, "b": 0}
    assert index.predict(probe, include_predicted=True) == {"a": 0, "b": 20}
    clock.now += 1.9
    assert index.predict(probe, include_predicted=True)["b"] == 20
    clock.now += 0.2
    assert index.predict(probe, include_predicted=True)["b"] == 0
    assert index.stats.predictions_expired == 5
    assert index.num_predicted() == 0


def test_the_predicted_entry_count_leaves_out_expired_predictions() -> None:
    clock = FakeClock()
    index = _index("a", clock=clock, prediction_ttl_s=2.0)
    assert index.add_prediction("a", _request(index, list(range(21)))) == 5
    assert index.num_predicted() == 5
    clock.now += 2.1
    assert index.num_predicted() == 0
    assert index.stats.predictions_expired == 5


def test_stored_events_confirm_predictions_and_failures_drop_them() -> None:
    clock = FakeClock()
    index = _index("a", clock=clock)
    request = _request(index, list(range(21)))
    index.add_prediction("a", request)
    _serve(index, "a", _manager(), _request(index, list(range(12))))
    assert index.stats.predictions_confirmed == 3
    assert index.num_predicted() == 2
    index.drop_predictions("a", request)
    assert index.num_predicted() == 0
    # Confirmed blocks stay; the exact and predicted views now agree.
    assert index.predict(request) == index.predict(request, include_predicted=True) == {"a": 12}


def test_a_refreshed_prediction_outlives_its_first_deadline() -> None:
    clock = FakeClock()
    index = _index("a", clock=clock, prediction_ttl_s=2.0)
    request = _request(index, list(range(9)))
    index.add_prediction("a", request)
    clock.now += 1.5
    index.add_prediction("a", request)
    clock.now += 1.0
    assert index.predict(request, include_predicted=True)["a"] == 8
    clock.now += 1.1
    assert index.predict(request, include_predicted=True)["a"] == 0


def test_hybrid_prediction_uses_the_window_rules() -> None:
    index = KVIndex(ALGO, SEED)
    hybrid = config(64, full(4), swa(4, 8))
    index.register("h", hybrid, hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    manager = KVCacheManager(
        hybrid, max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )
    _serve(index, "h", manager, _request(index, list(range(24))))
    # The window group only needs the 2 blocks before the hit point.
    window_events = [
        BlockRemoved(block_hashes=[event_hash(h)], medium="GPU", group_idx=1)
        for h in _request(index, list(range(24))).block_hashes[:3]
    ]
    index.apply("h", KVEventBatch(ts=0.0, events=window_events))
    probe = _request(index, list(range(25)))
    assert index.predict(probe)["h"] == 24
    shorter = _request(index, list(range(17)))
    assert index.predict(shorter)["h"] == 0


def test_reset_keeps_predictions_of_requests_in_flight() -> None:
    index = _index("a", "b")
    request = _request(index, list(range(21)))
    index.add_prediction("a", request)
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([1, 2])]))
    index.reset("a")
    index.apply("a", KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
    assert index.replica_block_count("a") == 0
    assert index.predict(request, include_predicted=True)["a"] == 20
    index.remove("a")
    assert index.num_predicted() == 0


@pytest.mark.parametrize(
    ("specs", "emptied_group", "expected"),
    [
        ((full(4), swa(4, 8), swa(4, 8)), 2, 0),
        ((full(4), swa(4, 8), swa(4, 8)), 1, 0),
        ((full(4), full(4)), 1, 0),
        ((full(4), full(4)), 0, 0),
        ((full(4), swa(4, 8), swa(4, 8)), None, 24),
    ],
    ids=["second-window", "first-window", "second-full", "first-full", "none"],
)
def test_every_group_of_a_shared_spec_must_hold_the_hit(
    specs: tuple[KVCacheSpec, ...], emptied_group: int | None, expected: int
) -> None:
    # Groups with one spec are looked up together; each must hold its blocks.
    index = KVIndex(ALGO, SEED)
    cfg = config(64, *specs)
    index.register("h", cfg, hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    manager = KVCacheManager(
        cfg, max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )
    _serve(index, "h", manager, _request(index, list(range(24))))
    if emptied_group is not None:
        removed = [
            BlockRemoved(block_hashes=[event_hash(h)], medium="GPU", group_idx=emptied_group)
            for h in _request(index, list(range(24))).block_hashes
        ]
        index.apply("h", KVEventBatch(ts=0.0, events=removed))
    assert index.predict(_request(index, list(range(25))))["h"] == expected


def test_after_a_prefix_cache_reset_events_are_stale_until_all_blocks_cleared() -> None:
    index = _index("a", "b")
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([1, 2])]))
    index.reset("a", until_cleared=True)
    # Published before the reset, delivered after it: dropped.
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([3, 4])]))
    index.apply("b", KVEventBatch(ts=0.0, events=[_stored([5])]))
    assert (index.replica_block_count("a"), index.replica_block_count("b")) == (0, 1)
    assert index.stats.stale_after_reset == 1
    # The batch with the reset's AllBlocksCleared: what follows it counts again.
    cleared = [_stored([6]), AllBlocksCleared(), _stored([7, 8])]
    index.apply("a", KVEventBatch(ts=0.0, events=cleared))
    index.apply("a", KVEventBatch(ts=0.0, events=[_stored([9])]))
    assert index.replica_block_count("a") == 3


def test_a_prefix_cache_reset_drops_the_replicas_predictions() -> None:
    index = _index("a")
    request = _request(index, list(range(12)))
    index.add_prediction("a", request)
    assert index.predict(request, include_predicted=True) == {"a": 8}
    index.reset("a", until_cleared=True)
    assert index.predict(request, include_predicted=True) == {"a": 0}


def _random_events(rng: random.Random, count: int) -> list[BlockStored | BlockRemoved]:
    """Stores and removals over a few keys and both groups of a hybrid replica, with
    untagged and unknown groups and malformed hashes among them."""
    groups = [0, 0, 0, 1, 1, None, 7]
    hashes = [*range(1, 9), -1, 1 << 64, b"\x00" * 7 + b"\x05", b""]
    events: list[BlockStored | BlockRemoved] = []
    for _ in range(count):
        keys = [rng.choice(hashes) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        group = rng.choice(groups)
        if rng.random() < 0.3:
            events.append(_stored(keys, group=group))  # type: ignore[arg-type]
        else:
            events.append(BlockRemoved(block_hashes=keys, medium="GPU", group_idx=group))
    return events


@pytest.mark.parametrize("seed", range(30))
def test_a_batch_applies_as_its_events_one_batch_each(seed: int) -> None:
    rng = random.Random(seed)
    hybrid = config(64, full(4), swa(4, 8))
    whole, single = KVIndex(ALGO, SEED), KVIndex(ALGO, SEED)
    for index in (whole, single):
        index.register("h", hybrid, hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    for _ in range(4):
        events = _random_events(rng, rng.randrange(1, 40))
        whole.apply("h", KVEventBatch(ts=0.0, events=events))
        for event in events:
            single.apply("h", KVEventBatch(ts=0.0, events=[event]))
    keys = np.arange(1, 9, dtype=np.uint64)
    for group in (0, 1):
        held = [index._groups[group].holding(keys, 0).tolist() for index in (whole, single)]
        assert held[0] == held[1]
    counted = [{**vars(index.stats), "batches": 0} for index in (whole, single)]
    assert counted[0] == counted[1]
    assert whole.replica_block_count("h") == single.replica_block_count("h")
