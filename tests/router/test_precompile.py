"""A router compiles every kernel it runs at start-up, never in a request or an
event batch: a kernel compiled cold takes seconds of the subscriber thread. Seen
against vLLM 0.32, whose map-encoded events went through a decoder kernel that the
start-up had not compiled: 3 s of router CPU inside the first measured round."""

from __future__ import annotations

import sys

from numba.core.registry import CPUDispatcher

from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.events.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecoder,
    WireEncoding,
    encode_batch,
)
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from kvroute.replicas.request import Request, SamplingParams
from kvroute.router.app.precompile import precompile
from kvroute.router.index.kv_index import KVIndex
from tests.replicas.conftest import config, full


def _compiled_signatures() -> dict[str, int]:
    """Every kvroute kernel loaded so far, by name: how many signatures it holds
    (compiled, or loaded from numba's disk cache, in this process)."""
    return {
        f"{module_name}.{name}": len(value.signatures)
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("kvroute.")
        for name, value in list(vars(module).items())
        if isinstance(value, CPUDispatcher)
    }


def _engine_events() -> KVEventBatch:
    """What an engine that hashes with its own seed publishes for one prompt."""
    manager = KVCacheManager(
        config(64, full(16)), max_model_len=1024, hash_block_size=16, enable_kv_cache_events=True
    )
    hasher = RequestBlockHasher(16, get_hash_fn_by_name("sha256"), BlockHash(b"engine-seed"))
    request = Request("r", list(range(1, 70)), SamplingParams(max_tokens=1), block_hasher=hasher)
    blocks, hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - hit, hit, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    manager.free(request)
    return KVEventBatch(ts=0.0, events=manager.take_events())


def test_ingest_and_lookup_compile_nothing_after_a_routers_start_up() -> None:
    batch = _engine_events()
    precompile()
    before = _compiled_signatures()
    index = KVIndex("xxh64_tokens", "router-seed")
    decoder = KVEventDecoder()
    for n, encoding in enumerate(WireEncoding):
        replica = f"engine-{n}"
        index.register(replica, config(64, full(16)), hash_block_size=16, hash_mode="tokens")
        index.apply(replica, decoder.decode(encode_batch(batch, encoding)))
    predicted = index.predict(PromptKeys(tuple(range(1, 70))))
    assert predicted == {"engine-0": 64, "engine-1": 64}
    after = _compiled_signatures()
    assert {name: count for name, count in after.items() if before.get(name, 0) != count} == {}


ARRAY = WireEncoding.ARRAY


def _stored(first: int, count: int) -> KVEventBatch:
    """`count` blocks of one prompt, hashed as kvroute's seeded replicas hash them."""
    hashes = list(range(first, first + count))
    tokens = [t % 32_000 for t in range(first * 16, (first + count) * 16)]
    return KVEventBatch(ts=0.0, events=[BlockStored(hashes, None, tokens, 16, None, None, None)])


def test_a_replicas_life_in_the_index_compiles_nothing_after_a_routers_start_up() -> None:
    """Growth past the table's first capacity, removals that shrink it, a cleared
    cache, a reset, and a replica removed (it died): the paths a chaos test takes,
    each of which once compiled a kernel on the router's loop."""
    precompile()
    before = _compiled_signatures()
    index = KVIndex("sha256", "kvroute")
    decoder = KVEventDecoder()
    for replica in ("replica-0", "replica-1"):
        index.register(
            replica,
            config(8_192, full(16)),
            hash_block_size=16,
            hash_algo="sha256",
            hash_seed="kvroute",
        )
    for first in range(1, 6_000, 500):
        index.apply("replica-0", decoder.decode(encode_batch(_stored(first, 500), ARRAY)))
    index.apply("replica-1", decoder.decode(encode_batch(_stored(1, 100), ARRAY)))
    removed = KVEventBatch(ts=0.0, events=[BlockRemoved(list(range(1, 5_500)), None)])
    index.apply("replica-0", decoder.decode(encode_batch(removed, ARRAY)))
    index.reset("replica-1")
    index.apply("replica-1", decoder.decode(encode_batch(_stored(1, 100), ARRAY)))
    cleared = KVEventBatch(ts=0.0, events=[AllBlocksCleared()])
    index.apply("replica-1", decoder.decode(encode_batch(cleared, ARRAY)))
    index.remove("replica-0")
    after = _compiled_signatures()
    assert {name: count for name, count in after.items() if before.get(name, 0) != count} == {}
