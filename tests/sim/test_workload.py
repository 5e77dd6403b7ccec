"""Prompts, lazy tokens, block keys and workload invariants."""

from __future__ import annotations

import random

import pytest

from kvroute.benchmarks.sim.workload import (
    ContentBlock,
    LiteralTokens,
    PromptSpec,
    SimRequest,
    Workload,
    block_keys,
    block_runs,
    content_tokens,
)

VOCAB = 32_000


def request(rid: str, *segments: ContentBlock | LiteralTokens, **kwargs: object) -> SimRequest:
    kwargs.setdefault("arrival_s", 0.0)
    return SimRequest(rid, PromptSpec(segments, VOCAB), 8, **kwargs)  # type: ignore[arg-type]


def test_content_tokens_are_a_pure_function_of_id_and_length() -> None:
    first = content_tokens(7, 512, VOCAB).tolist()
    assert content_tokens(7, 512, VOCAB).tolist() == first
    assert len(first) == 512
    assert all(0 <= t < VOCAB for t in first)
    assert content_tokens(8, 512, VOCAB).tolist() != first
    assert content_tokens("7", 512, VOCAB).tolist() != first


@pytest.mark.parametrize("length", [1, 15, 16, 100, 511])
def test_shorter_content_block_is_a_prefix_of_the_longer(length: int) -> None:
    assert (
        content_tokens(42, length, VOCAB).tolist()
        == content_tokens(42, 512, VOCAB)[:length].tolist()
    )
    assert (
        content_tokens("sys", length, VOCAB).tolist()
        == content_tokens("sys", 512, VOCAB)[:length].tolist()
    )


def test_prompt_materialises_segments_in_order() -> None:
    prompt = PromptSpec((ContentBlock(1, 20), LiteralTokens((5, 6, 7)), ContentBlock(2, 4)), VOCAB)
    tokens = prompt.token_ids()
    assert prompt.num_tokens == 27
    assert tokens == [
        *content_tokens(1, 20, VOCAB).tolist(),
        5,
        6,
        7,
        *content_tokens(2, 4, VOCAB).tolist(),
    ]
    assert all(type(t) is int for t in tokens)


def test_then_appends_segments_without_changing_the_original() -> None:
    base = PromptSpec((ContentBlock(1, 16),), VOCAB)
    longer = base.then(ContentBlock(2, 16))
    assert (base.num_tokens, longer.num_tokens) == (16, 32)
    assert longer.token_ids()[:16] == base.token_ids()


def test_invalid_segments_are_refused() -> None:
    with pytest.raises(ValueError, match="length 0"):
        ContentBlock(1, 0)
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*63\)"):
        ContentBlock(-1, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*63\)"):
        ContentBlock(2**63, 4)
    with pytest.raises(ValueError, match="at least one token"):
        LiteralTokens(())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PromptSpec((LiteralTokens((1, 10)),), vocab_size=10)
    with pytest.raises(ValueError, match="at least one segment"):
        PromptSpec((), VOCAB)


def test_trace_shaped_prompt_is_one_run_per_id_at_block_size_16() -> None:
    prompt = PromptSpec((ContentBlock(0, 512), ContentBlock(1, 512), ContentBlock(2, 100)), VOCAB)
    assert [count for _, count in block_runs(prompt, 16)] == [32, 32, 6]
    assert [count for _, count in block_runs(prompt, 512)] == [1, 1]


def test_block_keys_share_the_leading_blocks_of_a_shorter_last_id() -> None:
    short = request("a", ContentBlock(0, 512), ContentBlock(1, 100))
    long = request("b", ContentBlock(0, 512), ContentBlock(1, 512), ContentBlock(2, 512))
    short_keys, long_keys = block_keys(short, 16), block_keys(long, 16)
    assert len(short_keys) == 32 + 6
    assert long_keys[:38] == short_keys
    assert len(set(long_keys)) == 96


def test_same_content_after_a_different_prefix_has_different_keys() -> None:
    a = request("a", ContentBlock(0, 16), ContentBlock(5, 16))
    b = request("b", ContentBlock(1, 16), ContentBlock(5, 16))
    assert block_keys(a, 16)[1] != block_keys(b, 16)[1]


def test_blocks_straddling_segments_are_keyed_by_their_tokens() -> None:
    a = request("a", ContentBlock(0, 10), ContentBlock(1, 10), ContentBlock(2, 12))
    b = request("b", ContentBlock(0, 10), ContentBlock(1, 10), ContentBlock(3, 12))
    assert [count for _, count in block_runs(a.prompt, 8)] == [1, 1, 1, 1]
    keys_a, keys_b = block_keys(a, 8), block_keys(b, 8)
    assert keys_a[:2] == keys_b[:2]
    assert keys_a[2] != keys_b[2]


def random_prompts(rng: random.Random, count: int, block_size: int) -> list[PromptSpec]:
    """Prompts that share, cut and extend each other's segments, some misaligned."""
    prompts: list[PromptSpec] = []
    for _ in range(count):
        segments: list[ContentBlock | LiteralTokens] = []
        if prompts and rng.random() < 0.8:
            base = rng.choice(prompts).segments
            segments = list(base[: rng.randint(1, len(base))])
            last = segments[-1]
            if isinstance(last, ContentBlock) and rng.random() < 0.3:
                segments[-1] = ContentBlock(last.block_id, rng.randint(1, 3 * block_size))
        for _ in range(rng.randint(0 if segments else 1, 2)):
            if rng.random() < 0.15:
                tokens = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 2 * block_size)))
                segments.append(LiteralTokens(tokens))
            else:
                length = rng.choice([block_size, 2 * block_size, rng.randint(1, 3 * block_size)])
                segments.append(ContentBlock(rng.randrange(5), length))
        prompts.append(PromptSpec(tuple(segments), VOCAB))
    return prompts


def test_block_keys_are_equal_exactly_when_content_and_prefix_are() -> None:
    rng = random.Random(1)
    for _ in range(40):
        block_size = rng.choice([2, 4, 5])
        prompts = random_prompts(rng, 8, block_size)
        by_key: dict[int, tuple[int, ...]] = {}
        by_prefix: dict[tuple[int, ...], int] = {}
        for prompt in prompts:
            tokens = prompt.token_ids()
            keys = block_keys(SimRequest("r", prompt, 1, arrival_s=0.0), block_size)
            assert len(keys) == prompt.num_tokens // block_size
            for j, key in enumerate(keys):
                prefix = tuple(tokens[: (j + 1) * block_size])
                assert by_key.setdefault(key, prefix) == prefix
                assert by_prefix.setdefault(prefix, key) == key


def splitmix_token(key: int, position: int, vocab_size: int) -> int:
    """Token `position` of stream `key`, computed with Python ints (the documented formula)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return mix((mix(key) + (position + 1) * 0x9E3779B97F4A7C15) & mask) % vocab_size


def test_token_ids_follow_the_documented_stream_formula() -> None:
    prompt = request("a", ContentBlock(9, 40), ContentBlock(2**63 - 1, 3))
    expected = [splitmix_token(9, p, VOCAB) for p in range(40)]
    expected += [splitmix_token(2**63 - 1, p, VOCAB) for p in range(3)]
    assert prompt.token_ids() == expected


def test_workload_refuses_broken_invariants() -> None:
    a = request("a", ContentBlock(0, 8))
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        Workload("w", [a, a])
    with pytest.raises(ValueError, match="exactly one of arrival_s and after"):
        Workload("w", [a, request("b", ContentBlock(0, 8), after="a")])
    with pytest.raises(ValueError, match="exactly one of arrival_s and after"):
        Workload("w", [request("b", ContentBlock(0, 8), arrival_s=None)])
    with pytest.raises(ValueError, match="comes after 'c', not earlier"):
        Workload(
            "w",
            [
                request("b", ContentBlock(0, 8), arrival_s=None, after="c"),
                request("c", ContentBlock(0, 8)),
            ],
        )
    with pytest.raises(ValueError, match="vocab_size 32000, the workload 100"):
        Workload("w", [a], vocab_size=100)
    with pytest.raises(ValueError, match="max_tokens 0"):
        Workload("w", [SimRequest("z", a.prompt, 0, arrival_s=0.0)])


def test_processing_order_is_arrival_order_when_open_and_list_order_when_closed() -> None:
    late, early, tie = (
        request(rid, ContentBlock(0, 8), arrival_s=t)
        for rid, t in [("late", 2.0), ("early", 1.0), ("tie", 2.0)]
    )
    open_loop = Workload("open", [late, early, tie])
    assert [r.request_id for r in open_loop.in_processing_order()] == ["early", "late", "tie"]
    follow = request("follow", ContentBlock(0, 8), arrival_s=None, after="late", think_s=1.0)
    closed = Workload("closed", [late, follow, early])
    assert closed.is_closed_loop
    assert [r.request_id for r in closed.in_processing_order()] == ["late", "follow", "early"]


def test_workload_totals_prompt_tokens() -> None:
    w = Workload(
        "w",
        [request("a", ContentBlock(0, 8)), request("b", ContentBlock(1, 5), LiteralTokens((1,)))],
    )
    assert w.total_prompt_tokens == 14
    assert not w.is_closed_loop
