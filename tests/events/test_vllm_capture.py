"""Real-engine data: vLLM's own KV cache events, replayed into the router's index.

Each capture under tests/data/vllm holds the wire frames a real vLLM published while
serving a multi-tenant workload on a hybrid (full attention + sliding window) cache,
and vLLM's own hit for every prompt. Replaying the frames in order through kvroute's
frame parser and decoder into a `KVIndex`, the prediction for each prompt, made
after exactly the frames vLLM had published when it measured that prompt, must equal
vLLM's hit: with the engine's seed, and with a seed it was not given (re-keyed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import msgspec
import pytest

from kvroute.events.frames import parse_live
from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from kvroute.router.index.kv_index import KVIndex
from tests.events.vllm_capture import CAPTURE_PATHS, Capture, load_capture

REPLICA = "vllm"

IndexFactory = Callable[[Capture], KVIndex]


def seed_matched(capture: Capture) -> KVIndex:
    """An index hashing prompts with the engine's own hash function and seed."""
    index = KVIndex(capture.hash_algo, capture.python_hash_seed)
    index.register(
        REPLICA,
        capture.kv_cache_config(),
        hash_block_size=capture.hash_block_size,
        hash_algo=capture.hash_algo,
        hash_seed=capture.python_hash_seed,
    )
    return index


def rekeyed_with_an_unknown_seed(capture: Capture) -> KVIndex:
    """An index with a seed vLLM never used: it re-keys vLLM's blocks from the token
    ids its events carry (hash-agnostic mode)."""
    index = KVIndex(capture.hash_algo, "a seed the engine was not given")
    index.register(
        REPLICA,
        capture.kv_cache_config(),
        hash_block_size=capture.hash_block_size,
        hash_mode="tokens",
    )
    return index


INDEX_MODES: dict[str, IndexFactory] = {
    "seed-matched": seed_matched,
    "tokens-unknown-seed": rekeyed_with_an_unknown_seed,
}


@pytest.fixture(scope="module", params=CAPTURE_PATHS, ids=lambda p: p.name.split(".json")[0])
def capture(request: pytest.FixtureRequest) -> Capture:
    return load_capture(request.param)


def replay_and_predict(capture: Capture, make_index: IndexFactory) -> tuple[list[int], KVIndex]:
    """kvroute's predicted hit per prompt, each made after applying exactly the frames
    vLLM had published when it measured that prompt's hit; and the index at the end."""
    index = make_index(capture)
    frames = iter(capture.frames)
    applied = -1
    predicted: list[int] = []
    for prompt in capture.prompts:
        while applied < prompt.after_seq:
            seq, payload = parse_live(list(next(frames)))
            assert seq == applied + 1, f"frame {seq} after {applied}"
            index.apply(REPLICA, decode_batch(payload))
            applied = seq
        predicted.append(index.predict(prompt.keys)[REPLICA])
    return predicted, index


@pytest.mark.parametrize("mode", list(INDEX_MODES))
def test_prediction_equals_vllms_hit_for_every_prompt(capture: Capture, mode: str) -> None:
    predicted, index = replay_and_predict(capture, INDEX_MODES[mode])
    expected = [p.hit for p in capture.prompts]
    wrong = [
        (i, got, want)
        for i, (got, want) in enumerate(zip(predicted, expected, strict=True))
        if got != want
    ]
    assert not wrong, (
        f"{len(wrong)} of {len(expected)} prompts mispredicted (i, got, want): {wrong}"
    )
    stats = index.stats
    assert (stats.unknown_group, stats.mismatched_group, stats.bad_hash) == (0, 0, 0)
    assert stats.unkeyable == 0
    assert stats.removed_unknown == 0
    assert sum(1 for hit in expected if hit) > len(expected) // 3


def test_capture_exercises_eviction_groups_tenants_and_its_encoding(capture: Capture) -> None:
    """The capture covers what the equality above is meant to prove, on the real wire."""
    kinds: Counter[str] = Counter()
    stored_groups: set[int | None] = set()
    removed_groups: set[int | None] = set()
    encodings: set[str] = set()
    for seq, frame in enumerate(capture.frames):
        assert parse_live(list(frame))[0] == seq
        for raw in msgspec.msgpack.decode(frame[2])[1]:
            encodings.add("map" if isinstance(raw, dict) else "array")
        for event in decode_batch(frame[2]).events:
            kinds[type(event).__name__] += 1
            if isinstance(event, BlockStored):
                stored_groups.add(event.group_idx)
                layout = capture.groups[event.group_idx or 0]
                assert event.kv_cache_spec_kind == layout.kind
                assert event.kv_cache_spec_sliding_window == layout.sliding_window
            elif isinstance(event, BlockRemoved):
                removed_groups.add(event.group_idx)
    assert encodings == {capture.event_encoding}
    assert kinds[BlockStored.__name__] and kinds[BlockRemoved.__name__]
    assert kinds[AllBlocksCleared.__name__] == 1
    assert stored_groups == removed_groups == set(range(len(capture.groups)))
    assert {g.kind for g in capture.groups} == {"full_attention", "sliding_window"}
    prompts = capture.prompts
    assert any(p.keys.cache_salt for p in prompts) and any(p.keys.lora_name for p in prompts)
    assert max(p.turn for p in prompts) > 1


def test_captures_record_one_workload_in_both_encodings() -> None:
    """Every version served the same prompts; one capture is array-, one map-encoded.

    Their hits differ on a few prompts (newer vLLM caches and evicts differently),
    which is why each capture is checked against its own hits.
    """
    captures = [load_capture(path) for path in CAPTURE_PATHS]
    assert {c.event_encoding for c in captures} == {"array", "map"}
    workloads = {
        tuple((p.keys.token_ids, p.keys.lora_name, p.keys.cache_salt) for p in c.prompts)
        for c in captures
    }
    assert len(workloads) == 1
