"""Paged attention equals dense attention: every logits row the torch executor
produces, through prefix hits, chunked prefill and batched decode, matches the
same weights run over the whole sequence with a causal (and window) mask."""

from __future__ import annotations

import pytest
import torch

from kvroute.replicas.engine import Engine
from kvroute.replicas.model.attention import SeqSpan, attend_chunk, build_metadata
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


# Stated tolerance of 16-bit K/V against float32 dense attention (max |logit
# difference|; measured here: float16 1.0e-3, bfloat16 6.2e-3).
KV_TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-2}
# The attention itself stays exact up to rounding: against dense attention over K/V
# rounded the same way. Not bit-exact: a K/V value computed in a prefill chunk and in
# the dense pass's one long GEMM may differ in float32's last bit (the blocking
# follows the shape and the CPU's kernels), and near a rounding boundary that flips
# its 16-bit value by one unit. So the bound scales with the dtype's unit: 1e-4 for
# float16, 8x that for bfloat16's 8x coarser one (seen on an AVX512-BF16 CPU: 2.6e-4).
ROUNDED_TOLERANCE = {
    dtype: 1e-4 * torch.finfo(getattr(torch, dtype)).eps / torch.finfo(torch.float16).eps
    for dtype in KV_TOLERANCE
}


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "hybrid"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_kv_is_exact_up_to_its_rounding_and_within_its_tolerance_of_float32(
    dtype: str, hybrid: bool
) -> None:
    e = engine(settings(hybrid=hybrid, dtype=dtype, chunk=8))
    memory = executor(e).memory
    assert {t.dtype for t in [*memory.k, *memory.v]} == {getattr(torch, dtype)}
    # One K and one V tensor per layer of a group (shared by the groups), plus
    # the zero page past the pool's 128 blocks.
    assert len(memory.k) == 2
    assert memory.k[0].shape == (129, BLOCK, 2, 8)
    rec = Recorder()
    rec.attach(e)
    prompts = {"a": PROMPT, "b": PROMPT[: 3 * BLOCK] + tokens(4, 20)}  # b: after a hit
    outputs: dict[str, list[int]] = {}
    for request_id, prompt in prompts.items():
        e.add_request(request_id, prompt, GREEDY)
        outputs |= {r: o.output_token_ids for r, o in run(e).items()}
    assert rec.rows
    for request_id, position, row in rec.rows:
        sequence = prompts[request_id] + outputs[request_id]
        rounded = dense_logits(e, sequence, getattr(torch, dtype))[position]
        torch.testing.assert_close(row, rounded, rtol=0, atol=ROUNDED_TOLERANCE[dtype])
        full = dense_logits(e, sequence)[position]
        torch.testing.assert_close(row, full, rtol=0, atol=KV_TOLERANCE[dtype])


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


@pytest.mark.parametrize("merge_on_cpu", [True, False], ids=["lse-merge", "masked"])
@pytest.mark.parametrize("window", [None, 5, 300], ids=["full", "window-5", "window-300"])
@pytest.mark.parametrize(("prefix", "new"), [(0, 9), (0, 300), (6, 9), (4, 290)])
def test_every_form_of_chunk_attention_equals_masked_attention(
    prefix: int, new: int, window: int | None, merge_on_cpu: bool
) -> None:
    """The causal fast path, the log-sum-exp merge after a prefix, the masked
    fallback and query blocks over a window all equal one masked SDPA call."""
    gen = torch.Generator().manual_seed(prefix + new)
    q = torch.randn(new, 4, 8, generator=gen)
    k, v = torch.randn(2, prefix + new, 2, 8, generator=gen)
    out = attend_chunk(q, k[:prefix], v[:prefix], k[prefix:], v[prefix:], window, merge_on_cpu)
    key = torch.arange(prefix + new)
    query = prefix + torch.arange(new)[:, None]
    mask = (key <= query) & ((key > query - window) if window else True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 6], ids=["first-chunk", "after-prefix"])
def test_chunk_attention_keeps_a_16_bit_models_dtype(prefix: int) -> None:
    gen = torch.Generator().manual_seed(prefix)
    q = torch.randn(9, 4, 8, generator=gen)
    k, v = torch.randn(2, prefix + 9, 2, 8, generator=gen)
    expected = attend_chunk(q, k[:prefix], v[:prefix], k[prefix:], v[prefix:], None)
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = attend_chunk(q16, k16[:prefix], v16[:prefix], k16[prefix:], v16[prefix:], None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=3e-2)
