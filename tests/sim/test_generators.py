"""Synthetic workloads: counts, determinism, prefix sharing, closed-loop structure."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from kvroute.benchmarks.sim.generators import (
    agentic_tool_loops,
    generated_shared_prefix,
    multi_tenant,
    multi_turn_chat,
)
from kvroute.benchmarks.sim.workload import ContentBlock, Workload, block_keys

BLOCK = 16

SMALL: dict[str, Callable[[int], Workload]] = {
    "multi_tenant": lambda seed: multi_tenant(
        tenants=4,
        requests=30,
        system_prompt_tokens=100,
        question_tokens=20,
        output_tokens=5,
        zipf_s=1.0,
        rate=2.0,
        seed=seed,
    ),
    "multi_turn_chat": lambda seed: multi_turn_chat(
        sessions=3,
        turns=4,
        system_tokens=64,
        user_tokens=20,
        output_tokens=10,
        think_s=1.0,
        rate=1.0,
        seed=seed,
    ),
    "agentic_tool_loops": lambda seed: agentic_tool_loops(
        agents=2,
        steps=3,
        fanout=3,
        system_tokens=64,
        tool_tokens=16,
        output_tokens=8,
        think_s=0.5,
        rate=1.0,
        seed=seed,
    ),
    "generated_shared_prefix": lambda seed: generated_shared_prefix(
        groups=4, prompts_per_group=3, rate=4.0, seed=seed
    ),
}


def segments_of(workload: Workload) -> list[tuple[tuple[object, int], ...]]:
    return [
        tuple((s.block_id, s.length) for s in r.prompt.segments if isinstance(s, ContentBlock))
        for r in workload.requests
    ]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_gives_the_same_workload(name: str) -> None:
    a, b = SMALL[name](3), SMALL[name](3)
    assert a.requests == b.requests
    assert [r.token_ids() for r in a.requests] == [r.token_ids() for r in b.requests]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_different_seeds_share_no_content(name: str) -> None:
    a, b = SMALL[name](3), SMALL[name](4)
    assert a.requests[0].token_ids()[:16] != b.requests[0].token_ids()[:16]
    assert not {i for s in segments_of(a) for i, _ in s} & {i for s in segments_of(b) for i, _ in s}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_after_names_an_earlier_request(name: str) -> None:
    workload = SMALL[name](0)
    seen: set[str] = set()
    for request in workload.requests:
        assert (request.after is None) != (request.arrival_s is None)
        assert request.after is None or request.after in seen
        seen.add(request.request_id)


def test_multi_tenant_shape() -> None:
    workload = SMALL["multi_tenant"](0)
    assert len(workload.requests) == 30
    assert {r.num_tokens for r in workload.requests} == {120}
    assert {r.max_tokens for r in workload.requests} == {5}
    arrivals = [r.arrival_s for r in workload.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert not workload.is_closed_loop


def test_multi_tenant_requests_of_one_tenant_share_exactly_the_system_prompt_blocks() -> None:
    workload = SMALL["multi_tenant"](0)
    by_tenant: dict[str, list[list[int]]] = {}
    for request in workload.requests:
        by_tenant.setdefault(request.request_id.split("-")[0], []).append(
            block_keys(request, BLOCK)
        )
    shared = 100 // BLOCK
    for keys in by_tenant.values():
        for other in keys[1:]:
            assert other[:shared] == keys[0][:shared]
            assert other[shared] != keys[0][shared]
    firsts = [keys[0][0] for keys in by_tenant.values()]
    assert len(set(firsts)) == len(firsts)


def test_multi_tenant_popularity_follows_zipf() -> None:
    workload = multi_tenant(tenants=4, requests=4_000, zipf_s=1.0, rate=math.inf, seed=1)
    counts = [0] * 4
    for request in workload.requests:
        counts[int(request.request_id.split("-")[0].removeprefix("tenant"))] += 1
    assert counts == sorted(counts, reverse=True)
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.1)
    assert {r.arrival_s for r in workload.requests} == {0.0}


def test_chat_turn_extends_the_previous_turn_with_its_answer_and_a_new_message() -> None:
    workload = SMALL["multi_turn_chat"](0)
    assert len(workload.requests) == 12
    turns = {r.request_id: r for r in workload.requests}
    for s in range(3):
        first = turns[f"chat-s{s}-t0"]
        assert first.arrival_s is not None and first.after is None
        assert first.num_tokens == 64 + 20
        for t in range(1, 4):
            turn, previous = turns[f"chat-s{s}-t{t}"], turns[f"chat-s{s}-t{t - 1}"]
            assert (turn.after, turn.think_s, turn.arrival_s) == (previous.request_id, 1.0, None)
            assert turn.prompt.segments[: len(previous.prompt.segments)] == previous.prompt.segments
            assert turn.num_tokens == previous.num_tokens + 10 + 20
            assert turn.session == first.session == f"chat-s{s}"


def test_chat_sessions_share_only_the_system_prompt() -> None:
    workload = SMALL["multi_turn_chat"](0)
    turns = {r.request_id: r for r in workload.requests}
    a, b = block_keys(turns["chat-s0-t2"], BLOCK), block_keys(turns["chat-s1-t2"], BLOCK)
    assert a[:4] == b[:4]
    assert a[4] != b[4]


def test_chat_lists_turns_in_nominal_time_order() -> None:
    workload = SMALL["multi_turn_chat"](0)
    starts = {r.session: r.arrival_s for r in workload.requests if r.arrival_s is not None}
    nominal = [starts[r.session] + int(r.request_id[-1]) * 1.0 for r in workload.requests]
    assert nominal == sorted(nominal)


def test_agentic_steps_fan_out_over_a_growing_context_and_join_on_the_last_call() -> None:
    workload = SMALL["agentic_tool_loops"](0)
    assert len(workload.requests) == 2 * 3 * 3
    calls = {r.request_id: r for r in workload.requests}
    for a in range(2):
        step0 = [calls[f"agent-a{a}-s0-c{i}"] for i in range(3)]
        assert len({c.arrival_s for c in step0}) == 1
        assert [c.num_tokens for c in step0] == [64 + 16] * 3
        for step in (1, 2):
            for i in range(3):
                call = calls[f"agent-a{a}-s{step}-c{i}"]
                assert (call.after, call.think_s) == (f"agent-a{a}-s{step - 1}-c2", 0.5)
                assert call.num_tokens == 64 + step * 3 * (16 + 8) + 16
        context = calls[f"agent-a{a}-s2-c0"].prompt.segments[:-1]
        previous = [calls[f"agent-a{a}-s1-c{i}"].prompt.segments for i in range(3)]
        appended = [str(s.block_id).rsplit("/", 1)[1] for s in context[len(previous[0]) - 1 :]]
        assert context[: len(previous[0])] == previous[0]
        assert appended == ["tool0", "answer0", "tool1", "answer1", "tool2", "answer2"]


def test_agentic_calls_of_one_step_share_the_context_blocks() -> None:
    workload = SMALL["agentic_tool_loops"](0)
    calls = {r.request_id: r for r in workload.requests}
    keys = [block_keys(calls[f"agent-a0-s1-c{i}"], BLOCK) for i in range(3)]
    shared = (64 + 3 * (16 + 8)) // BLOCK
    assert keys[0][:shared] == keys[1][:shared] == keys[2][:shared]
    assert len({k[shared] for k in keys}) == 3


def test_generated_shared_prefix_matches_sglang_defaults() -> None:
    workload = generated_shared_prefix(seed=0)
    assert len(workload.requests) == 64 * 16
    assert {r.num_tokens for r in workload.requests} == {2048 + 128}
    assert {r.max_tokens for r in workload.requests} == {256}
    assert workload.total_prompt_tokens == 1024 * 2176
    groups = [r.request_id.split("-")[1] for r in workload.requests]
    assert groups != sorted(groups, key=lambda g: int(g[1:]))


def test_generated_shared_prefix_groups_share_the_system_prompt_blocks() -> None:
    workload = SMALL["generated_shared_prefix"](0)
    by_group: dict[str, list[list[int]]] = {}
    for request in workload.requests:
        by_group.setdefault(request.request_id.split("-")[1], []).append(block_keys(request, BLOCK))
    assert sorted(len(v) for v in by_group.values()) == [3, 3, 3, 3]
    for keys in by_group.values():
        assert keys[0][:128] == keys[1][:128] == keys[2][:128]
        assert len({k[128] for k in keys}) == 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: multi_tenant(tenants=0), "tenants must be at least 1"),
        (lambda: multi_tenant(zipf_s=-1.0), "zipf_s"),
        (lambda: multi_turn_chat(rate=0.0), "rate 0.0 must be positive"),
        (lambda: agentic_tool_loops(fanout=0), "fanout must be at least 1"),
        (lambda: generated_shared_prefix(question_tokens=0), "question_tokens"),
    ],
)
def test_invalid_parameters_are_refused(make: Callable[[], Workload], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
