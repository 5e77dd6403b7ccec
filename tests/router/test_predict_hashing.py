"""`KVIndex.predict` hashes a prompt itself unless the request's own hashes are the same."""

from __future__ import annotations

from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.events.kv_events import KVEventBatch
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.utils import RequestBlockHasher
from kvroute.replicas.request import Request, SamplingParams
from kvroute.router.index.kv_index import KVIndex
from tests.replicas.conftest import config, full

ALGO, SEED = "sha256", "seed"
PROMPT = list(range(1, 18))  # 4 full blocks of 4 tokens and one more token


def _served_index() -> tuple[KVIndex, RequestBlockHasher]:
    """An index that has applied one replica's events for PROMPT, and a hasher equal to the
    index's but made separately (the index's own `hasher()` is never called here)."""
    index = KVIndex(ALGO, SEED)
    index.register("a", config(64, full(4)), hash_block_size=4, hash_algo=ALGO, hash_seed=SEED)
    twin = RequestBlockHasher(4, index.hash_fn, index.none_hash)
    manager = KVCacheManager(
        config(64, full(4)), max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )
    served = Request("served", PROMPT, SamplingParams(max_tokens=1), block_hasher=twin)
    assert manager.allocate_slots(served, served.num_tokens) is not None
    index.apply("a", KVEventBatch(ts=0.0, events=manager.take_events()))
    return index, twin


def test_request_without_a_hasher_is_hashed_by_the_index() -> None:
    index, _ = _served_index()
    request = Request("probe", PROMPT, SamplingParams(max_tokens=1))
    assert request.block_hashes == []
    assert index.predict(request) == {"a": 16}


def test_request_hashed_by_an_equal_but_separate_hasher_is_predicted() -> None:
    index, twin = _served_index()
    request = Request("probe", PROMPT, SamplingParams(max_tokens=1), block_hasher=twin)
    assert index.predict(request) == {"a": 16}


def test_request_hashed_with_another_seed_is_rehashed_with_the_index_seed() -> None:
    index, _ = _served_index()
    other_root = RequestBlockHasher(4, index.hash_fn, get_hash_fn_by_name(ALGO)(b"other-seed"))
    request = Request("probe", PROMPT, SamplingParams(max_tokens=1), block_hasher=other_root)
    assert index.predict(request) == {"a": 16}


def test_hashers_compare_by_size_function_and_root() -> None:
    fn = get_hash_fn_by_name(ALGO)
    root = fn(b"root")
    base = RequestBlockHasher(4, fn, root)
    assert base.computes_same_hashes_as(RequestBlockHasher(4, fn, root))
    assert not base.computes_same_hashes_as(RequestBlockHasher(8, fn, root))
    assert not base.computes_same_hashes_as(RequestBlockHasher(4, fn, fn(b"other")))
    assert not base.computes_same_hashes_as(
        RequestBlockHasher(4, get_hash_fn_by_name("sha256_cbor"), root)
    )
    assert not base.computes_same_hashes_as(None)
