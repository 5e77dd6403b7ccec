"""Seeded text workloads for routers side by side: the same prompts, byte for byte,
through every path.

Prompts are printable ASCII, so with serve-replica's byte tokenizer one character is
one token, and a router that matches text (vllm-router's and sglang-router's
`cache_aware`) sees exactly the prefixes the engine caches. A workload is a list of
sessions; a session's turns run one after another (a later turn extends an earlier
one with text the workload wrote, never with the model's output, so every path
sends the same bytes), sessions run `concurrency` at a time.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

ALPHABET = string.ascii_letters + string.digits + " .,;:-"
LAYOUTS = ("full", "hybrid")


@dataclass(frozen=True)
class Workload:
    """`sessions[i]` is one session's prompts, in turn order; `layout` names the
    engines' KV layout it runs on (full attention, or full + a sliding window)."""

    name: str
    layout: str
    sessions: tuple[tuple[str, ...], ...]
    max_tokens: int
    about: str

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.sessions)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for s in self.sessions for p in s)

    def bound(self, block_size: int = 16) -> float:
        """The prefix-cache hit rate of one cache that never evicts: the most any
        router can reach, since each distinct block must be computed once somewhere.
        Counted as vLLM counts (`vllm:prefix_cache_hits` over `..._queries`): one token
        per character (the byte tokenizers), whole blocks, never a prompt's last
        token. Sessions' turns run in order; across sessions order does not matter
        to a cache that keeps everything."""
        seen: set[str] = set()
        hits = 0
        for session in self.sessions:
            for prompt in session:
                usable = (len(prompt) - 1) // block_size
                blocks = [prompt[: (k + 1) * block_size] for k in range(len(prompt) // block_size)]
                leading = next((k for k in range(usable) if blocks[k] not in seen), usable)
                hits += leading * block_size
                seen.update(blocks)
        return hits / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class Scale:
    """How big the workloads are; `engine_tokens` is one engine's KV cache in tokens
    (the cache-pressure case sizes its hot prefixes from it)."""

    requests: int
    sessions: int
    engine_tokens: int
    engines: int
    max_tokens: int = 6


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(ALPHABET, k=n))


def tenants(rng: random.Random, scale: Scale) -> Workload:
    """Tenants with shared system prompts, Zipf-popular; one request per session."""
    count = 6
    prompts = [f"[tenant {t}] " + _text(rng, 760) for t in range(count)]
    weights = [1 / (t + 1) for t in range(count)]
    sessions = tuple(
        (rng.choices(prompts, weights)[0] + " Q: " + _text(rng, 64),) for _ in range(scale.requests)
    )
    return Workload(
        "tenants",
        "full",
        sessions,
        scale.max_tokens,
        f"{count} tenants, 770-token system prompts (Zipf), 67-token questions",
    )


def chat(rng: random.Random, scale: Scale) -> Workload:
    """Multi-turn conversations under one short shared system prompt."""
    system = "[assistant] " + _text(rng, 240)
    sessions = []
    for _ in range(scale.sessions):
        history, turns = system, []
        for _ in range(rng.randint(3, 5)):
            history += " USER: " + _text(rng, 96)
            turns.append(history)
            history += " ASSISTANT: " + _text(rng, 48)
        sessions.append(tuple(turns))
    return Workload(
        "chat",
        "full",
        tuple(sessions),
        scale.max_tokens,
        "3-5 turns, 103-token user turns, 60-token replies, 252-token shared system prompt",
    )


def agentic(rng: random.Random, scale: Scale) -> Workload:
    """Agent loops: each step appends one of a few long tool outputs that many
    agents share, so the same long text recurs inside different prefixes."""
    tools = [f"<tool {k}> " + _text(rng, 500) for k in range(3)]
    sessions = []
    for a in range(scale.sessions):
        context, steps = f"[agent {a}] task: " + _text(rng, 120), []
        for _ in range(rng.randint(3, 4)):
            context += " " + rng.choice(tools) + " thought: " + _text(rng, 32)
            steps.append(context)
        sessions.append(tuple(steps))
    return Workload(
        "agentic",
        "full",
        tuple(sessions),
        scale.max_tokens,
        "3-4 steps, each + one of 3 shared 509-token tool outputs",
    )


def _pressure(rng: random.Random, scale: Scale, name: str, layout: str) -> Workload:
    """Hot prefixes worth 2x one engine's cache (2/3 of the cluster's with 3
    engines): round robin thrashes every cache, a router that partitions keeps them."""
    prefix_tokens = 1024
    count = max(2, 2 * scale.engine_tokens // prefix_tokens)
    hot = [f"[doc {d:02d}] " + _text(rng, prefix_tokens - 9) for d in range(count)]
    sessions = tuple((rng.choice(hot) + " Q: " + _text(rng, 32),) for _ in range(scale.requests))
    return Workload(
        name,
        layout,
        sessions,
        scale.max_tokens,
        f"{count} hot 1,024-token prefixes = {count * prefix_tokens / scale.engine_tokens:.1f}x "
        f"one engine's cache, {count * prefix_tokens / (scale.engine_tokens * scale.engines):.0%}"
        " of the cluster's",
    )


def pressure(rng: random.Random, scale: Scale) -> Workload:
    return _pressure(rng, scale, "pressure", "full")


def hybrid(rng: random.Random, scale: Scale) -> Workload:
    """The cache-pressure case on engines whose window layers free old blocks."""
    return _pressure(rng, scale, "hybrid", "hybrid")


GENERATORS = {
    "tenants": tenants,
    "chat": chat,
    "agentic": agentic,
    "pressure": pressure,
    "hybrid": hybrid,
}


def build(names: list[str], scale: Scale, seed: int) -> list[Workload]:
    """The named workloads; each draws from its own generator seeded by (seed, name),
    so adding or dropping one leaves the others' prompts unchanged."""
    unknown = [n for n in names if n not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {sorted(GENERATORS)}")
    return [GENERATORS[n](random.Random(f"{seed}:{n}"), scale) for n in names]
