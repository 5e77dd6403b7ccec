"""KVCacheManager behaviour the seed implies but does not pin."""

from __future__ import annotations

import pytest
import torch

from kvroute.events.kv_events import BlockRemoved, BlockStored
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.specs import KVCacheSpec, MambaSpec, MLAAttentionSpec
from kvroute.replicas.kv_cache.utils import maybe_convert_block_hash
from tests.replicas.conftest import config, full, mamba, manager, request, swa


def _schedule_chunks(mgr: KVCacheManager, req, chunk: int) -> list[tuple[list[int], ...]]:
    """Prefill `req` chunk by chunk as an engine would; block tables after each step."""
    computed, num_computed = mgr.get_computed_blocks(req)
    tables = []
    first = True
    while req.num_computed_tokens < req.num_tokens:
        hit = num_computed if first else 0
        todo = min(chunk, req.num_tokens - req.num_computed_tokens - hit)
        blocks = mgr.allocate_slots(req, todo, hit, computed if first else None)
        assert blocks is not None
        req.num_computed_tokens += hit + todo
        first = False
        mgr.new_step_starts()
        tables.append(mgr.get_block_ids(req.request_id))
    return tables


def test_chunked_prefill_of_hybrid_model_recycles_window_blocks() -> None:
    # Full attention + a 2-block window, 16-token blocks, 32-token chunks.
    mgr = manager(64, full(16), swa(16, 32), max_num_batched_tokens=32)
    req = request("r", list(range(160)), 16)
    tables = _schedule_chunks(mgr, req, 32)
    assert len(tables) == 5
    # Full attention keeps every block; the window group nulls out blocks that
    # fell behind the window (tokens < computed - 31) before each new chunk.
    assert [len(t[0]) for t in tables] == [2, 4, 6, 8, 10]
    # Before chunk k (k >= 1), 32k tokens are computed and 32k - 31 fall outside
    # the window: (32k - 31) // 16 whole blocks.
    assert [sum(1 for b in t[1] if b == 0) for t in tables] == [0, 0, 2, 4, 6]
    # So a request holds at most 4 window blocks, within the admission cap of
    # cdiv(31 + 32, 16) + 1 = 5.
    assert [sum(1 for b in t[1] if b != 0) for t in tables] == [2, 4, 4, 4, 4]
    mgr.free(req)
    # The whole prompt was cached: a replay hits 144 tokens (the last block is
    # recomputed for logits and 159 // 16 = 9 full blocks remain).
    replay = request("replay", list(range(160)), 16)
    _, hit = mgr.get_computed_blocks(replay)
    assert hit == 144


def test_chunked_prefill_of_full_and_mamba_hits_at_chunk_boundaries() -> None:
    mgr = manager(80, full(16), mamba(16), max_num_batched_tokens=48)
    req = request("r", list(range(200)), 16)
    _schedule_chunks(mgr, req, 48)
    mgr.free(req)
    # Mamba keeps a checkpoint per block here, so any block boundary hits.
    _, hit = mgr.get_computed_blocks(request("a", list(range(100)), 16))
    assert hit == 96
    _, hit = mgr.get_computed_blocks(request("b", [*range(64), 7, 7, 7, 7], 16))
    assert hit == 64


def test_eviction_under_memory_pressure_emits_removals_in_lru_order() -> None:
    mgr = manager(5, full(4), enable_kv_cache_events=True)
    first = request("a", list(range(16)), 4)
    assert mgr.allocate_slots(first, 16) is not None
    (stored,) = mgr.take_events()
    assert isinstance(stored, BlockStored) and len(stored.block_hashes) == 4
    mgr.free(first)
    second = request("b", list(range(100, 112)), 4)
    assert mgr.allocate_slots(second, 12) is not None
    events = mgr.take_events()
    # Freed tail-first, so the prompt's last blocks are evicted first.
    evicted = [maybe_convert_block_hash(h) for h in reversed(first.block_hashes[1:])]
    assert events[:3] == [
        BlockRemoved(block_hashes=[h], medium="GPU", group_idx=0) for h in evicted
    ]
    assert isinstance(events[3], BlockStored)
    assert events[3].block_hashes == [maybe_convert_block_hash(h) for h in second.block_hashes]
    assert events[3].kv_cache_spec_kind == "full_attention"
    assert len(events) == 4
    # The first block survived and still hits.
    _, hit = mgr.get_computed_blocks(request("c", list(range(9)), 4))
    assert hit == 4


def test_sparse_window_group_event_lists_only_cached_blocks() -> None:
    # Full attention 32-token blocks + 8-token window blocks: per 32-token
    # segment only the window tail (1 block) is cached.
    mgr = manager(100, full(32), swa(8, 8), enable_kv_cache_events=True)
    req = request("r", [i // 8 for i in range(64)], 8)
    assert mgr.allocate_slots(req, 64) is not None
    full_event, window_event = mgr.take_events()
    assert full_event.group_idx == 0 and len(full_event.block_hashes) == 2
    assert window_event.group_idx == 1
    assert window_event.kv_cache_spec_sliding_window == 8
    assert window_event.block_hashes == [
        maybe_convert_block_hash(req.block_hashes[i]) for i in (3, 7)
    ]
    assert window_event.extra_keys == [None, None]
    assert len(window_event.token_ids) == 64


def test_event_extra_keys_name_lora_and_salt_per_block() -> None:
    from kvroute.replicas.request import LoRARequest

    mgr = manager(10, full(4), enable_kv_cache_events=True)
    req = request("r", list(range(8)), 4, lora_request=LoRARequest("ad", 2), cache_salt="s")
    mgr.allocate_slots(req, 8)
    (event,) = mgr.take_events()
    assert event.extra_keys == [("ad", "s"), ("ad",)]
    assert (event.lora_id, event.lora_name) == (2, "ad")


def test_prefix_cache_stats_count_requests_queries_and_hits() -> None:
    mgr = manager(20, full(4), log_stats=True)
    first = request("a", list(range(10)), 4)
    mgr.get_computed_blocks(first)
    mgr.allocate_slots(first, 10)
    second = request("b", list(range(12)), 4)
    mgr.get_computed_blocks(second)
    preempted = request("c", list(range(9)), 4)
    preempted.num_preemptions = 1
    mgr.get_computed_blocks(preempted)
    stats = mgr.make_prefix_cache_stats()
    assert stats is not None
    assert (stats.requests, stats.queries, stats.hits) == (2, 22, 8)
    assert (stats.preempted_requests, stats.preempted_queries, stats.preempted_hits) == (1, 9, 8)
    assert stats.hit_rate == pytest.approx(8 / 22)
    fresh = mgr.make_prefix_cache_stats()
    assert fresh is not None and fresh.requests == 0 and not fresh.reset
    mgr.free(first)
    assert mgr.reset_prefix_cache()
    assert mgr.prefix_cache_stats is not None and mgr.prefix_cache_stats.reset


def test_reset_prefix_cache_with_blocks_in_use_keeps_everything() -> None:
    mgr = manager(10, full(4), enable_kv_cache_events=True)
    req = request("a", list(range(8)), 4)
    mgr.allocate_slots(req, 8)
    mgr.take_events()
    assert not mgr.reset_prefix_cache()
    assert mgr.take_events() == []
    _, hit = mgr.get_computed_blocks(request("b", list(range(9)), 4))
    assert hit == 8
    assert mgr.get_block_ids("a") == ([1, 2],)


def test_prompt_logprobs_request_skips_the_cache() -> None:
    from kvroute.replicas.request import SamplingParams

    mgr = manager(10, full(4))
    mgr.allocate_slots(request("a", list(range(8)), 4), 8)
    wants_logprobs = request("b", list(range(9)), 4)
    wants_logprobs.sampling_params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    blocks, hit = mgr.get_computed_blocks(wants_logprobs)
    assert hit == 0 and blocks is mgr.empty_kv_cache_blocks


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: manager(10, full(16), max_model_len=0), "max_model_len must be positive"),
        (lambda: KVCacheManager(config(10), 100, 16), "no KV cache groups"),
        (
            lambda: KVCacheManager(config(10, full(16)), 100, hash_block_size=8),
            "hash_block_size == block_size",
        ),
        (
            lambda: KVCacheManager(config(10, full(32), swa(16, 32)), 100, hash_block_size=24),
            "must be a multiple of hash_block_size",
        ),
        (
            lambda: KVCacheManager(
                config(10, full(32), swa(16, 32)), 100, hash_block_size=16, scheduler_block_size=48
            ),
            "multiple of every group block size",
        ),
        (
            lambda: manager(10, full(16), prefix_cache_retention_interval=16),
            "no sliding-window group",
        ),
        (
            lambda: manager(10, KVCacheSpec(block_size=16)),
            "no block manager for KV cache spec kind 'unknown'",
        ),
        (lambda: manager(10, full(16), dcp_world_size=2), "context parallelism"),
        (lambda: swa(16, 0), "sliding_window must be positive"),
        (lambda: full(0), "block_size must be positive"),
        (lambda: mamba(16, "sometimes"), "mamba_cache_mode must be one of"),
        (
            lambda: MLAAttentionSpec(
                block_size=16, num_kv_heads=1, head_size=8, dtype=torch.uint8, compress_ratio=3
            ),
            "compress_ratio 3 must be positive and divide block_size 16",
        ),
    ],
)
def test_invalid_configs_raise_clear_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_retention_interval_env_var_must_be_an_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVROUTE_PREFIX_CACHE_RETENTION_INTERVAL", "often")
    with pytest.raises(ValueError, match="must be an integer, got 'often'"):
        manager(10, full(16), swa(16, 32))


def test_retention_interval_argument_overrides_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVROUTE_PREFIX_CACHE_RETENTION_INTERVAL", "33")
    mgr = manager(10, full(16), swa(16, 32), prefix_cache_retention_interval=32)
    assert mgr.coordinator.retention_interval == 32


def test_allocate_slots_rejects_empty_and_negative_requests() -> None:
    mgr = manager(10, full(4))
    req = request("a", list(range(8)), 4)
    with pytest.raises(ValueError, match="num_new_tokens must be greater than 0"):
        mgr.allocate_slots(req, 0)
    with pytest.raises(ValueError, match="non-negative"):
        mgr.allocate_slots(req, -1)


def test_running_request_cannot_take_new_prefix_hits() -> None:
    mgr = manager(10, full(4))
    other = request("a", list(range(8)), 4)
    mgr.allocate_slots(other, 8)
    req = request("b", list(range(9)), 4)
    mgr.allocate_slots(req, 1)
    hit_blocks, hit = mgr.get_computed_blocks(req)
    assert hit == 8
    with pytest.raises(ValueError, match="running request b cannot take new prefix hits"):
        mgr.allocate_slots(req, 1, hit, hit_blocks)


def test_page_sizes_follow_dtypes() -> None:
    assert full(16).page_size_bytes == 2 * 16 * 1 * 1 * 4
    mla = MLAAttentionSpec(
        block_size=256, num_kv_heads=1, head_size=576, dtype=torch.bfloat16, compress_ratio=4
    )
    assert mla.page_size_bytes == 64 * 576 * 2
    assert (
        MambaSpec(
            block_size=16, shapes=((2, 3), (4,)), dtypes=(torch.float16, torch.float32)
        ).page_size_bytes
        == 12 + 16
    )
    assert mla.kind.value == "mla_attention"


@pytest.mark.parametrize(
    ("num_tokens", "expected"),
    [(17, 8), (20, 8), (21, 8), (25, 16), (33, 24), (16, 0)],
)
def test_eagle_keeps_a_hit_shorter_than_the_window_when_block_and_hit_sizes_differ(
    num_tokens: int, expected: int
) -> None:
    # Full attention in 8-token blocks, a 12-token window in 4-token blocks:
    # hits are multiples of 8. With EAGLE, a hit of 8 needs the full group's
    # tokens 0-15 and the window group's tokens 0-11 (0-7 before the hit, 8-11
    # peeked). All 40 prompt tokens are cached, so that hit is there; aligning
    # the window's run (3 blocks -> 2) before dropping the peeked block lost it.
    mgr = manager(64, full(8), swa(4, 12), use_eagle=True)
    tokens = list(range(40))
    first = request("first", tokens, 4)
    assert mgr.allocate_slots(first, 40) is not None
    first.num_computed_tokens = 40
    mgr.free(first)
    probe = request("probe", tokens[:num_tokens], 4)
    blocks, hit = mgr.get_computed_blocks(probe)
    assert hit == expected
    assert [len(group) for group in blocks.blocks] == [expected // 8, expected // 4]


@pytest.mark.parametrize(("num_tokens", "expected"), [(17, 12), (21, 16), (25, 20), (5, 0)])
def test_eagle_with_a_mamba_group_never_reports_more_than_full_attention_holds(
    num_tokens: int, expected: int
) -> None:
    # With EAGLE, full attention needs the block after the hit, so a 17-token
    # prompt (at most 16 cached) hits 12. Mamba does not drop a peeked block:
    # offered one block past the candidate, it reported 16 while the full
    # group held 3 blocks, a hit longer than one group's blocks.
    mgr = manager(64, full(4), mamba(4), use_eagle=True)
    tokens = list(range(40))
    first = request("first", tokens, 4)
    assert mgr.allocate_slots(first, 40) is not None
    first.num_computed_tokens = 40
    mgr.new_step_starts()
    mgr.free(first)
    probe = request("probe", tokens[:num_tokens], 4)
    blocks, hit = mgr.get_computed_blocks(probe)
    assert hit == expected
    assert [len(group) for group in blocks.blocks] == [expected // 4, expected // 4]


@pytest.mark.parametrize(("num_blocks", "admitted"), [(46, True), (45, False)])
def test_admission_counts_the_window_group_at_its_cap_exactly(
    num_blocks: int, admitted: bool
) -> None:
    # A 512-token prompt: 32 full-attention blocks, and for a 64-token window
    # with 128-token chunks at most ceil((63 + 128) / 16) + 1 = 13 window
    # blocks at once: 45 blocks, the pool's usable blocks being num_blocks - 1.
    mgr = manager(num_blocks, full(16), swa(16, 64), max_num_batched_tokens=128, max_model_len=1024)
    req = request("long", list(range(512)), 16)
    got = mgr.allocate_slots(req, 16, full_sequence_must_fit=True)
    assert (got is not None) == admitted
