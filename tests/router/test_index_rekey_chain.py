"""Tokens-mode re-keying with a compiled chain hash (`xxh64_tokens`).

A real block manager hashes with sha256 and a seed the router does not know;
the index re-keys its events with `xxh64_tokens`, which re-keys a plain event's
whole chain in one compiled call. The result must equal the block manager's own
hits, and the keys an index gets re-keying block by block with the same bytes.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from kvroute.events.hashing import get_hash_fn_by_name, xxh64_tokens
from kvroute.events.kv_events import BlockRemoved, BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from kvroute.replicas.request import LoRARequest, Request, SamplingParams
from kvroute.router.index.ingest import event_hash
from kvroute.router.index.kv_index import KVIndex
from tests.replicas.conftest import config, full, swa

SEED, ENGINE_SEED = "router-seed", "engine-secret"


def _index(manager: KVCacheManager) -> KVIndex:
    index = KVIndex("xxh64_tokens", SEED)
    index.register("engine", manager.kv_cache_config, hash_block_size=4, hash_mode="tokens")
    return index


def _block_by_block(manager: KVCacheManager) -> KVIndex:
    """An index whose function makes the same bytes but has no compiled chain."""
    index = _index(manager)
    rekeyer = index._rekeyers["engine"]
    rekeyer.hash_fn = lambda value: xxh64_tokens(value)
    return index


def test_rekeying_in_one_call_predicts_the_engines_own_hits() -> None:
    manager = KVCacheManager(
        config(48, full(4), swa(4, 8)),
        max_model_len=1024,
        hash_block_size=4,
        enable_kv_cache_events=True,
    )
    chained, single = _index(manager), _block_by_block(manager)
    engine_hasher = RequestBlockHasher(
        4, get_hash_fn_by_name("sha256"), BlockHash(get_hash_fn_by_name("sha256")(ENGINE_SEED))
    )
    rng = random.Random(7)
    prefixes = [[rng.randrange(50_000) for _ in range(rng.randrange(8, 40))] for _ in range(4)]
    for i in range(60):
        prefix = prefixes[rng.randrange(len(prefixes))]
        tokens = [*prefix[: rng.randrange(4, len(prefix) + 1)], rng.randrange(50_000)]
        kwargs: dict[str, object] = {}
        if i % 7 == 3:
            kwargs["lora_request"] = LoRARequest("adapter", 1)
        request = Request(
            f"r{i}",
            tokens,
            SamplingParams(max_tokens=1),
            block_hasher=engine_hasher,
            **kwargs,  # type: ignore[arg-type]
        )
        keys = PromptKeys(tuple(tokens), lora_name="adapter" if kwargs else None)
        blocks, hit = manager.get_computed_blocks(request)
        assert chained.predict(keys) == {"engine": hit}
        assert single.predict(keys) == {"engine": hit}
        if manager.allocate_slots(request, request.num_tokens - hit, hit, blocks) is None:
            continue
        request.num_computed_tokens = request.num_tokens
        manager.free(request)
        batch = KVEventBatch(ts=0.0, events=manager.take_events())
        chained.apply("engine", batch)
        single.apply("engine", batch)
    assert chained.stats.unkeyable == single.stats.unkeyable == 0
    assert len(chained) == len(single) > 0
    assert chained._rekeyers["engine"].own_hashes() == single._rekeyers["engine"].own_hashes()


def test_vllms_events_listing_no_extra_keys_per_block_are_rekeyed_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM sends `extra_keys` as a None for each block that has none: the same
    blocks as an event without the field, re-keyed by the compiled chain."""
    manager = KVCacheManager(
        config(16, full(4)), max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )
    tokens = list(range(100, 113))
    plain = BlockStored([11, 12, 13], None, tokens[:12], 4, None, None, None)
    as_vllm = msgspec.structs.replace(plain, extra_keys=[None, None, None])
    expected = _index(manager)
    expected.apply("engine", KVEventBatch(ts=0.0, events=[plain]))

    def per_block(*_: object) -> bytes:
        raise AssertionError("hashed block by block")

    monkeypatch.setattr("kvroute.router.index.rekey.hash_block_tokens", per_block)
    index = _index(manager)
    index.apply("engine", KVEventBatch(ts=0.0, events=[as_vllm]))
    assert index.predict(PromptKeys(tuple(tokens))) == {"engine": 12}
    assert index._rekeyers["engine"].own_hashes() == expected._rekeyers["engine"].own_hashes()


def test_a_run_of_single_block_removals_is_rekeyed_as_one_event() -> None:
    """Engines evict block by block, one BlockRemoved each: a run of them from one
    group becomes one event in the router's keys; a hash never stored is counted."""
    manager = KVCacheManager(
        config(16, full(4)), max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )
    tokens = list(range(100, 113))
    index = _index(manager)
    index.apply(
        "engine",
        KVEventBatch(0.0, [BlockStored([11, 12, 13], None, tokens[:12], 4, None, None, None)]),
    )
    rekeyer = index._rekeyers["engine"]
    own = rekeyer.own_hashes()
    removals = [BlockRemoved([13], None), BlockRemoved([12], None), BlockRemoved([99], None)]
    rekeyed = rekeyer.rekey(KVEventBatch(0.0, [*removals, BlockRemoved([11], "cpu")]))
    assert [type(e) for e in rekeyed.events] == [BlockRemoved, BlockRemoved]
    assert rekeyed.events[0].block_hashes == [event_hash(own[13]), event_hash(own[12])]
    assert rekeyed.events[1].block_hashes == [event_hash(own[11])]
    assert rekeyed.events[1].medium == "cpu"
    assert index.stats.removed_unknown == 1
    assert rekeyer.own_hashes() == {}
