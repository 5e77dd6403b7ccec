"""Synthetic workloads, deterministic for a seed.

Sessions, agents or single requests start open loop, with Poisson arrivals at `rate` per
second (`math.inf`: all at time 0). Content ids carry the generator's name and the seed, so
two seeds share no content. Closed-loop workloads list their requests in nominal time order:
the first request's arrival plus the think times before it, service time taken as zero; the
bounds process requests in that list order, and every `after` names an earlier request.
"""

from __future__ import annotations

import math

import numpy as np

from kvroute.benchmarks.sim.workload import (
    DEFAULT_VOCAB_SIZE,
    ContentBlock,
    PromptSpec,
    SimRequest,
    Workload,
)


def multi_tenant(
    tenants: int = 32,
    requests: int = 2_000,
    system_prompt_tokens: int = 2_048,
    question_tokens: int = 256,
    output_tokens: int = 128,
    zipf_s: float = 1.1,
    rate: float = 10.0,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Workload:
    """Tenants' system prompts followed by fresh questions; tenant k (from 0) is picked with
    probability proportional to 1 / (k + 1) ** zipf_s (zipf_s = 0: uniform)."""
    _check_positive(tenants=tenants, requests=requests, system_prompt_tokens=system_prompt_tokens)
    _check_positive(question_tokens=question_tokens, output_tokens=output_tokens)
    if zipf_s < 0:
        raise ValueError(f"zipf_s {zipf_s} must not be negative")
    rng = np.random.default_rng(seed)
    arrivals = _poisson_arrivals(rng, requests, rate)
    weights = 1.0 / np.arange(1, tenants + 1) ** zipf_s
    picks = rng.choice(tenants, size=requests, p=weights / weights.sum()).tolist()
    ns = f"multi_tenant/{seed}"
    items = [
        SimRequest(
            request_id=f"tenant{tenant}-q{i}",
            prompt=PromptSpec(
                (
                    ContentBlock(f"{ns}/system{tenant}", system_prompt_tokens),
                    ContentBlock(f"{ns}/question{i}", question_tokens),
                ),
                vocab_size,
            ),
            max_tokens=output_tokens,
            arrival_s=arrival,
        )
        for i, (tenant, arrival) in enumerate(zip(picks, arrivals, strict=True))
    ]
    return Workload(
        "multi_tenant",
        items,
        f"{requests} requests over {tenants} tenants (Zipf s={zipf_s}), system prompt "
        f"{system_prompt_tokens} + question {question_tokens} tokens, {rate} req/s, seed {seed}",
        vocab_size,
    )


def multi_turn_chat(
    sessions: int = 200,
    turns: int = 6,
    system_tokens: int = 1_024,
    user_tokens: int = 256,
    output_tokens: int = 256,
    think_s: float = 10.0,
    rate: float = 1.0,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Workload:
    """Chat sessions over one shared system prompt.

    Turn 0 is system + user message; turn k is turn k-1's prompt + the previous answer +
    a new user message. The answer is its own content block of `output_tokens` (the
    simulator's real outputs are pseudo-random and unknown up front, so a later turn never
    hits the engine's output blocks). Turns after the first come `think_s` after the
    previous turn finishes.
    """
    _check_positive(sessions=sessions, turns=turns, system_tokens=system_tokens)
    _check_positive(user_tokens=user_tokens, output_tokens=output_tokens)
    rng = np.random.default_rng(seed)
    starts = _poisson_arrivals(rng, sessions, rate)
    ns = f"multi_turn_chat/{seed}"
    system = ContentBlock(f"{ns}/system", system_tokens)
    timed: list[tuple[float, int, SimRequest]] = []
    for s, start in enumerate(starts):
        prompt = PromptSpec((system,), vocab_size)
        previous: str | None = None
        for turn in range(turns):
            if previous is not None:
                prompt = prompt.then(ContentBlock(f"{ns}/s{s}/answer{turn - 1}", output_tokens))
            prompt = prompt.then(ContentBlock(f"{ns}/s{s}/user{turn}", user_tokens))
            request_id = f"chat-s{s}-t{turn}"
            request = SimRequest(
                request_id=request_id,
                prompt=prompt,
                max_tokens=output_tokens,
                arrival_s=start if previous is None else None,
                session=f"chat-s{s}",
                after=previous,
                think_s=0.0 if previous is None else think_s,
            )
            timed.append((start + turn * think_s, turn, request))
            previous = request_id
    return Workload(
        "multi_turn_chat",
        _in_nominal_order(timed),
        f"{sessions} sessions x {turns} turns, system {system_tokens}, user {user_tokens}, "
        f"answer {output_tokens} tokens, think {think_s} s, {rate} sessions/s, seed {seed}",
        vocab_size,
    )


def agentic_tool_loops(
    agents: int = 50,
    steps: int = 6,
    fanout: int = 4,
    system_tokens: int = 4_096,
    tool_tokens: int = 512,
    output_tokens: int = 128,
    think_s: float = 2.0,
    rate: float = 0.5,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Workload:
    """Agents that fan out `fanout` parallel calls per step over a growing context.

    Context at step 0: the system prompt, shared by all agents. Call i of step k sends the
    agent's context + its own tool result (`tool_tokens`). The context of step k+1 appends,
    for each call of step k in order, its tool result and its answer (`output_tokens`).
    Join rule: one `after` cannot wait for all calls, so every call of step k+1 comes
    `think_s` (tool time) after the last-listed call of step k; the calls of a step are
    issued together with equal shapes and finish close together. Step 0's calls all
    arrive at the agent's start.
    """
    _check_positive(agents=agents, steps=steps, fanout=fanout, system_tokens=system_tokens)
    _check_positive(tool_tokens=tool_tokens, output_tokens=output_tokens)
    rng = np.random.default_rng(seed)
    starts = _poisson_arrivals(rng, agents, rate)
    ns = f"agentic_tool_loops/{seed}"
    system = ContentBlock(f"{ns}/system", system_tokens)
    timed: list[tuple[float, int, SimRequest]] = []
    for a, start in enumerate(starts):
        context = PromptSpec((system,), vocab_size)
        join: str | None = None
        for step in range(steps):
            tools = [ContentBlock(f"{ns}/a{a}/s{step}/tool{i}", tool_tokens) for i in range(fanout)]
            for i, tool in enumerate(tools):
                request = SimRequest(
                    request_id=f"agent-a{a}-s{step}-c{i}",
                    prompt=context.then(tool),
                    max_tokens=output_tokens,
                    arrival_s=start if join is None else None,
                    session=f"agent-a{a}",
                    after=join,
                    think_s=0.0 if join is None else think_s,
                )
                timed.append((start + step * think_s, step, request))
            for i, tool in enumerate(tools):
                answer = ContentBlock(f"{ns}/a{a}/s{step}/answer{i}", output_tokens)
                context = context.then(tool, answer)
            join = f"agent-a{a}-s{step}-c{fanout - 1}"
    return Workload(
        "agentic_tool_loops",
        _in_nominal_order(timed),
        f"{agents} agents x {steps} steps x {fanout} calls, system {system_tokens}, tool "
        f"{tool_tokens}, answer {output_tokens} tokens, think {think_s} s, {rate} agents/s, "
        f"seed {seed}",
        vocab_size,
    )


def generated_shared_prefix(
    groups: int = 64,
    prompts_per_group: int = 16,
    system_tokens: int = 2_048,
    question_tokens: int = 128,
    output_tokens: int = 256,
    rate: float = 16.0,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Workload:
    """SGLang's generated-shared-prefix benchmark: each group's system prompt + a question,
    all prompts shuffled (as SGLang does), then Poisson arrivals."""
    _check_positive(groups=groups, prompts_per_group=prompts_per_group)
    _check_positive(system_tokens=system_tokens, question_tokens=question_tokens)
    _check_positive(output_tokens=output_tokens)
    rng = np.random.default_rng(seed)
    ns = f"generated_shared_prefix/{seed}"
    pairs = [(g, q) for g in range(groups) for q in range(prompts_per_group)]
    order = rng.permutation(len(pairs)).tolist()
    arrivals = _poisson_arrivals(rng, len(pairs), rate)
    items = []
    for index, arrival in zip(order, arrivals, strict=True):
        g, q = pairs[index]
        prompt = PromptSpec(
            (
                ContentBlock(f"{ns}/system{g}", system_tokens),
                ContentBlock(f"{ns}/g{g}/question{q}", question_tokens),
            ),
            vocab_size,
        )
        items.append(SimRequest(f"gsp-g{g}-q{q}", prompt, output_tokens, arrival_s=arrival))
    return Workload(
        "generated_shared_prefix",
        items,
        f"{groups} groups x {prompts_per_group} prompts, system {system_tokens} + question "
        f"{question_tokens} tokens, output {output_tokens}, {rate} req/s, seed {seed}",
        vocab_size,
    )


def _poisson_arrivals(rng: np.random.Generator, count: int, rate: float) -> list[float]:
    """Arrival times of a Poisson process at `rate` per second; all 0.0 when rate is inf."""
    if not rate > 0:
        raise ValueError(f"rate {rate} must be positive")
    if math.isinf(rate):
        return [0.0] * count
    return np.cumsum(rng.exponential(1.0 / rate, size=count)).tolist()


def _in_nominal_order(timed: list[tuple[float, int, SimRequest]]) -> list[SimRequest]:
    """Sort by (nominal time, depth in the chain); a request never precedes its `after`."""
    return [request for _, _, request in sorted(timed, key=lambda item: item[:2])]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
