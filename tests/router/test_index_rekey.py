"""Hash-agnostic indexing: a replica hashing with a seed the router was not told.

The replica here is a real block manager whose requests hash with their own
seed; the index registers it in "tokens" mode and must predict its own hits
from the token ids the events carry, and refuse (counted) what it cannot key.
"""

from __future__ import annotations

import msgspec
import pytest

from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from kvroute.replicas.request import LoRARequest, Request, SamplingParams
from kvroute.router.index.kv_index import KVIndex
from tests.replicas.conftest import config, full, swa

ALGO, ROUTER_SEED, ENGINE_SEED = "sha256", "router-seed", "engine-secret"


def _setup(*specs: object, num_blocks: int = 64) -> tuple[KVIndex, KVCacheManager]:
    manager = KVCacheManager(
        config(num_blocks, *specs),  # type: ignore[arg-type]
        max_model_len=1024,
        hash_block_size=4,
        enable_kv_cache_events=True,
    )
    index = KVIndex(ALGO, ROUTER_SEED)
    index.register("engine", manager.kv_cache_config, hash_block_size=4, hash_mode="tokens")
    return index, manager


def _engine_request(index: KVIndex, tokens: list[int], rid: str, **kwargs: object) -> Request:
    hasher = RequestBlockHasher(4, index.hash_fn, BlockHash(index.hash_fn(ENGINE_SEED)))
    return Request(rid, tokens, SamplingParams(max_tokens=4), block_hasher=hasher, **kwargs)  # type: ignore[arg-type]


def _serve(index: KVIndex, manager: KVCacheManager, request: Request) -> None:
    blocks, hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - hit, hit, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    manager.free(request)
    index.apply("engine", KVEventBatch(ts=0.0, events=manager.take_events()))


def test_tokens_mode_predicts_a_replica_with_an_unknown_seed() -> None:
    index, manager = _setup(full(4), swa(4, 8))
    tokens = list(range(1, 27))
    _serve(index, manager, _engine_request(index, tokens, "a"))
    probe = _engine_request(index, [*tokens[:22], 99], "b")
    assert manager.get_computed_blocks(probe)[1] == 20
    assert index.predict(PromptKeys(tuple(probe.prompt_token_ids))) == {"engine": 20}
    assert index.stats.unkeyable == 0


def test_seeded_mode_refuses_the_same_replica_with_a_clear_error() -> None:
    index = KVIndex(ALGO, ROUTER_SEED)
    with pytest.raises(ValueError, match=r"seed 'engine-secret'.*every lookup would miss"):
        index.register(
            "engine",
            config(8, full(4)),
            hash_block_size=4,
            hash_algo=ALGO,
            hash_seed=ENGINE_SEED,
        )


def test_salt_and_lora_enter_the_router_keys() -> None:
    index, manager = _setup(full(4))
    tokens = list(range(1, 18))
    lora = LoRARequest("adapter", 1)
    _serve(index, manager, _engine_request(index, tokens, "a", cache_salt="t1", lora_request=lora))
    salted = PromptKeys(tuple(tokens), lora_name="adapter", cache_salt="t1")
    assert index.predict(salted) == {"engine": 16}
    assert index.predict(PromptKeys(tuple(tokens), lora_name="adapter")) == {"engine": 0}
    assert index.predict(PromptKeys(tuple(tokens), cache_salt="t1")) == {"engine": 0}


def test_removal_and_clear_apply_through_the_engine_keys() -> None:
    index, manager = _setup(full(4))
    request = _engine_request(index, list(range(1, 18)), "a")
    _serve(index, manager, request)
    keys = PromptKeys(tuple(range(1, 18)))
    engine_hashes = [int.from_bytes(h[-8:], "big") for h in request.block_hashes]
    index.apply("engine", KVEventBatch(0.0, [BlockRemoved(engine_hashes[2:], "GPU", 0)]))
    assert index.predict(keys) == {"engine": 8}
    index.apply("engine", KVEventBatch(0.0, [AllBlocksCleared()]))
    assert index.predict(keys) == {"engine": 0}
    assert len(index) == 0


def test_events_that_cannot_be_rekeyed_are_dropped_and_counted() -> None:
    index, manager = _setup(full(4))
    request = _engine_request(index, list(range(1, 18)), "a")
    _serve(index, manager, request)
    stored = len(index)
    no_tokens = BlockStored([7], None, [], 4, None, "GPU", None, group_idx=0)
    orphan = BlockStored([8], 12345, [1, 2, 3, 4], 4, None, "GPU", None, group_idx=0)
    index.apply("engine", KVEventBatch(0.0, [no_tokens, orphan]))
    assert index.stats.unkeyable == 2
    assert len(index) == stored


def test_an_event_of_the_wrong_block_size_is_refused_by_ingest() -> None:
    index, _ = _setup(full(4))
    wrong = BlockStored([7], None, list(range(8)), 8, None, "GPU", None, group_idx=0)
    index.apply("engine", KVEventBatch(0.0, [wrong]))
    assert index.stats.mismatched_group == 1
    assert len(index) == 0


def test_a_retention_interval_cannot_be_rekeyed() -> None:
    index = KVIndex(ALGO, ROUTER_SEED)
    with pytest.raises(ValueError, match=r"retention interval.*seeded mode"):
        index.register(
            "engine",
            config(8, full(4)),
            hash_block_size=4,
            prefix_cache_retention_interval=16,
            hash_mode="tokens",
        )


def test_rekeyed_batches_keep_their_other_fields() -> None:
    index, manager = _setup(full(4))
    request = _engine_request(index, list(range(1, 10)), "a")
    blocks, hit = manager.get_computed_blocks(request)
    manager.allocate_slots(request, request.num_tokens, hit, blocks)
    (event,) = manager.take_events()
    rekeyer = index._rekeyers["engine"]
    out = rekeyer.rekey(KVEventBatch(ts=3.5, events=[event], data_parallel_rank=2))
    assert (out.ts, out.data_parallel_rank) == (3.5, 2)
    (rekeyed,) = out.events
    mine = index.hasher(4).prompt_hashes(PromptKeys(tuple(range(1, 10))))
    assert rekeyed.block_hashes == [int.from_bytes(h[-8:], "big") for h in mine]
    assert msgspec.structs.replace(rekeyed, block_hashes=event.block_hashes) == event
