"""Paged attention equals dense attention: every logits row the torch executor
produces, through prefix hits, chunked prefill and batched decode, matches the
same weights run over the whole sequence with a causal (and window) mask."""

from __future__ import annotations

import pytest
import torch

from kvroute.replicas.engine import Engine
from kvroute.replicas.model.attention import SeqSpan, build_metadata
from tests.replicas.model.helpers import (
    BLOCK,
    GREEDY,
    Recorder,
    dense_logits,
    engine,
    executor,
    run,
    settings,
    tokens,
)

PROMPT = tokens(1, 8 * BLOCK)


def _check_against_dense(e: Engine, rec: Recorder, sequences: dict[str, list[int]]) -> None:
    assert rec.rows
    # Causal: the full sequence's row at a position is that of its prefix.
    dense = {r: dense_logits(e, s) for r, s in sequences.items()}
    for request_id, position, row in rec.rows:
        torch.testing.assert_close(row, dense[request_id][position], rtol=0, atol=1e-4)


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "hybrid"])
@pytest.mark.parametrize("chunk", [3, 8, 256])
@pytest.mark.parametrize(
    ("shared", "expected_hit"),
    [(0, 0), (5 * BLOCK + 1, 5 * BLOCK), (len(PROMPT), len(PROMPT) - BLOCK)],
    ids=["no-hit", "partial-hit", "all-but-last-block"],
)
def test_paged_logits_equal_dense_through_prefix_hits_and_chunks(
    hybrid: bool, chunk: int, shared: int, expected_hit: int
) -> None:
    e = engine(settings(hybrid=hybrid, chunk=chunk))
    rec = Recorder()
    rec.attach(e)
    e.add_request("first", PROMPT, GREEDY)
    outputs = run(e)
    second = PROMPT[:shared] + tokens(2, len(PROMPT) - shared)
    e.add_request("second", second, GREEDY)
    outputs |= run(e)
    assert outputs["second"].num_cached_tokens == expected_hit
    _check_against_dense(
        e,
        rec,
        {
            "first": PROMPT + outputs["first"].output_token_ids,
            "second": second + outputs["second"].output_token_ids,
        },
    )


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "hybrid"])
def test_batched_decode_of_requests_of_different_lengths_equals_dense(hybrid: bool) -> None:
    e = engine(settings(hybrid=hybrid))
    rec = Recorder()
    rec.attach(e)
    decode_batches: list[int] = []
    ex = executor(e)
    forward = ex.forward

    def counting(batch):  # type: ignore[no-untyped-def]
        decode_batches.append(sum(1 for s in batch if s.num_new == 1))
        return forward(batch)

    ex.forward = counting  # type: ignore[method-assign]
    prompts = {f"r{n}": tokens(n, n) for n in (3, 9, 17, 30)}
    for request_id, prompt in prompts.items():
        e.add_request(request_id, prompt, GREEDY)
    outputs = run(e)
    assert max(decode_batches) == len(prompts)
    _check_against_dense(e, rec, {r: p + outputs[r].output_token_ids for r, p in prompts.items()})


def test_window_reads_start_at_the_first_in_window_block() -> None:
    """A query at position 13 with window 7 reads positions 7..13 only: blocks
    1..3 of the table; block 0 (the null block here) is never gathered."""
    meta = build_metadata(
        [SeqSpan(start=0, num_computed=13, num_new=1, block_ids=[0, 5, 6, 7])],
        block_size=4,
        window=7,
        device=torch.device("cpu"),
    )
    keys = meta.decode_keys
    assert keys is not None
    assert keys.slots[0].tolist() == [*range(20, 24), *range(24, 28), *range(28, 32)]
    assert keys.valid[0].tolist() == [False, False, False, True] + [True] * 6 + [False] * 2
    assert meta.slot_mapping.tolist() == [29]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_kv_memory_is_allocated_in_the_groups_dtype(dtype: str) -> None:
    e = engine(settings(hybrid=True, dtype=dtype))
    memory = executor(e).memory
    assert {t.dtype for t in [*memory.k, *memory.v]} == {getattr(torch, dtype)}
    # One K and one V tensor per layer of a group, shared by the two groups.
    assert len(memory.k) == 2
    assert memory.k[0].shape == (128, BLOCK, 2, 8)
    rec = Recorder()
    rec.attach(e)
    e.add_request("a", PROMPT, GREEDY)
    outputs = run(e)
    dense = dense_logits(e, PROMPT + outputs["a"].output_token_ids)
    for _, position, row in rec.rows:
        torch.testing.assert_close(row, dense[position], rtol=0, atol=0.1)  # 16-bit K/V


def test_window_group_forgets_blocks_and_attention_never_reads_them() -> None:
    """The window group's table starts with null blocks once a request is past
    its window; with the null block and every free block poisoned (NaN), the
    logits still equal dense attention."""
    e = engine(settings(hybrid=True, chunk=8, poison=True))
    rec = Recorder()
    rec.attach(e)
    ex = executor(e)
    forward = ex.forward
    window_tables: list[list[int]] = []

    def spying(batch):  # type: ignore[no-untyped-def]
        window_tables.extend(e.kv_cache.get_block_ids(s.request.request_id)[1] for s in batch)
        return forward(batch)

    ex.forward = spying  # type: ignore[method-assign]
    e.add_request("a", PROMPT, GREEDY)
    outputs = run(e)
    null = e.kv_cache.block_pool.null_block.block_id
    assert window_tables[-1][:5] == [null] * 5
    _check_against_dense(e, rec, {"a": PROMPT + outputs["a"].output_token_ids})
