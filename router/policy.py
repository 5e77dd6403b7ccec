"""Routing policies: choose a replica from predicted hits and replica load.

Every policy sees the same `Candidate` list (one per live replica, in a stable
order) and returns one replica id. `kv_aware` is the default; the others are
the baselines people deploy today, kept small and behind one interface so
benchmarks compare like with like.
"""

from __future__ import annotations

import functools
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol

import msgspec
import numpy as np
from numba import njit

from kvroute.replicas.api import ReplicaLoad
from kvroute.replicas.kv_cache.utils import BlockHash


@dataclass(frozen=True)
class Candidate:
    replica_id: str
    hit_tokens: int
    load: ReplicaLoad


@dataclass(frozen=True)
class CandidateColumns:
    """The candidates as arrays, row i being the i-th `Candidate` of the same list:
    what a vectorized policy scores without a Python step per replica."""

    hit_tokens: np.ndarray  # int64
    queued_prefill_tokens: np.ndarray  # int64
    active_seqs: np.ndarray  # int64
    kv_usage: np.ndarray  # float64

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> CandidateColumns:
        count = len(candidates)
        loads = [c.load for c in candidates]
        return cls(
            np.fromiter((c.hit_tokens for c in candidates), np.int64, count),
            np.fromiter((load.queued_prefill_tokens for load in loads), np.int64, count),
            np.fromiter((load.active_seqs for load in loads), np.int64, count),
            np.fromiter((load.kv_usage for load in loads), np.float64, count),
        )


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may know about the prompt being routed."""

    num_tokens: int
    block_hashes: Sequence[BlockHash] = ()


class RoutingPolicy(Protocol):
    name: ClassVar[str]

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str: ...

    def forget(self, replica_id: str) -> None:
        """Drop what the policy keeps about a replica that left."""
        ...


class StatelessPolicy:
    """A policy that keeps nothing per replica, so there is nothing to forget."""

    def forget(self, replica_id: str) -> None:
        del replica_id


def _require(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise ValueError("no replica is available to route to")


def _load_key(c: Candidate) -> tuple[int, int]:
    return (c.load.queued_prefill_tokens, c.load.active_seqs)


class RoundRobin(StatelessPolicy):
    """Each replica in turn, ignoring cache and load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        _require(candidates)
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice.replica_id


class RandomChoice(StatelessPolicy):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        _require(candidates)
        return self._rng.choice(candidates).replica_id


class LeastLoaded(StatelessPolicy):
    """Fewest queued prefill tokens, then fewest running sequences."""

    name = "least_loaded"

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        _require(candidates)
        return min(candidates, key=_load_key).replica_id


class PrefixOnly(StatelessPolicy):
    """Longest predicted hit, load ignored (ties: least loaded)."""

    name = "prefix_only"

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        _require(candidates)
        return min(candidates, key=lambda c: (-c.hit_tokens, *_load_key(c))).replica_id


@dataclass(frozen=True)
class CostWeights:
    """Seconds per unit: the kv_aware cost is an estimate of time to first token.

    `prefill_s_per_token` prices tokens the replica must still prefill (this
    prompt's uncached part plus its queue); `decode_s_per_seq` the slowdown each
    running sequence adds to every step; `kv_usage_s` a penalty for a nearly
    full cache (evictions destroy others' hits).
    """

    prefill_s_per_token: float = 1e-4
    decode_s_per_seq: float = 2e-3
    kv_usage_s: float = 0.0
    # Weight of the replica's queued prefill relative to this prompt's own
    # uncached tokens. Below 1, the router keeps a prompt with its prefix a
    # little longer under load: a miss also duplicates the prefix and evicts
    # other hits, a cost the current request's TTFT does not show. 0.15 won in
    # the simulator (benchmarks/tuning.py, configs/bench.yaml) and on real
    # engines against the peer routers (benchmarks/results/peers/queue-weight/:
    # at 1.0 kv_aware lost 11-19 points of hit rate to prefix trees; at 0.15 it
    # ties them).
    queue_weight: float = 0.15


class KVAware(StatelessPolicy):
    """Lowest estimated TTFT: uncached prefill + queued prefill + decode load.

    Ties go to the less loaded replica, then to a seeded random pick. With a
    softmax `temperature` (seconds) the choice is sampled with probability
    proportional to exp(-cost / temperature) instead.
    """

    name = "kv_aware"

    def __init__(
        self,
        weights: CostWeights | dict[str, float] | None = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if isinstance(weights, dict):
            weights = CostWeights(**weights)
        self.weights = weights or CostWeights()
        _warm_up_least_cost_rows()
        self.temperature = temperature
        self._rng = random.Random(seed)

    def cost(self, request: RouteRequest, candidate: Candidate) -> float:
        w = self.weights
        uncached = request.num_tokens - candidate.hit_tokens
        load = candidate.load
        return (
            w.prefill_s_per_token * (uncached + w.queue_weight * load.queued_prefill_tokens)
            + w.decode_s_per_seq * load.active_seqs
            + w.kv_usage_s * load.kv_usage
        )

    def costs(self, request: RouteRequest, columns: CandidateColumns) -> np.ndarray:
        """`cost` of every row, bit for bit: the same IEEE operations in the same order."""
        w = self.weights
        uncached = request.num_tokens - columns.hit_tokens
        return (
            w.prefill_s_per_token * (uncached + w.queue_weight * columns.queued_prefill_tokens)
            + w.decode_s_per_seq * columns.active_seqs
            + w.kv_usage_s * columns.kv_usage
        )

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        _require(candidates)
        return candidates[self.choose_row(request, CandidateColumns.of(candidates))].replica_id

    def choose_row(self, request: RouteRequest, columns: CandidateColumns) -> int:
        """The chosen row. Ties within 1e-12 s of the lowest cost go to the lowest
        (queued prefill, active seqs), then to `_rng.choice` over the tied rows in
        order; sampling draws `_rng.choices` over every row. The draws are the ones
        a per-candidate loop makes, so a seed gives the same choices either way."""
        if not columns.hit_tokens.size:
            raise ValueError("no replica is available to route to")
        if self.temperature > 0:
            listed = self.costs(request, columns).tolist()
            best = min(listed)
            weights = [math.exp(-(c - best) / self.temperature) for c in listed]
            return self._rng.choices(range(len(listed)), weights=weights)[0]
        w = self.weights
        tied = _least_cost_rows(
            request.num_tokens,
            columns.hit_tokens,
            columns.queued_prefill_tokens,
            columns.active_seqs,
            columns.kv_usage,
            w.prefill_s_per_token,
            w.queue_weight,
            w.decode_s_per_seq,
            w.kv_usage_s,
        )
        return int(tied[0]) if tied.size == 1 else self._rng.choice(tied.tolist())


@njit(cache=True)
def _least_cost_rows(
    num_tokens: int,
    hits: np.ndarray,
    queued: np.ndarray,
    active: np.ndarray,
    usage: np.ndarray,
    prefill_s_per_token: float,
    queue_weight: float,
    decode_s_per_seq: float,
    kv_usage_s: float,
) -> np.ndarray:
    """The rows `KVAware.choose_row` draws from: cost within 1e-12 of the lowest,
    then the lowest queued prefill, then the fewest active sequences. Each cost is
    `KVAware.costs`' row, the same IEEE operations in the same order, in one
    compiled pass instead of a dozen array calls."""
    costs = np.empty(hits.size, np.float64)
    for i in range(hits.size):
        uncached = num_tokens - hits[i]
        costs[i] = (
            prefill_s_per_token * (uncached + queue_weight * np.float64(queued[i]))
            + decode_s_per_seq * np.float64(active[i])
            + kv_usage_s * usage[i]
        )
    tied = np.flatnonzero(costs <= costs.min() + 1e-12)
    if tied.size > 1:
        least = queued[tied].min()
        tied = tied[queued[tied] == least]
    if tied.size > 1:
        fewest = active[tied].min()
        tied = tied[active[tied] == fewest]
    return tied


@functools.cache
def _warm_up_least_cost_rows() -> None:
    """Compile `_least_cost_rows` for the core's column types now (or load it from
    numba's disk cache), not in the first request."""
    ints = np.zeros(2, np.int64)
    _least_cost_rows(1, ints, ints, ints, np.zeros(2, np.float64), 1e-4, 0.15, 2e-3, 0.0)


class SGLangLike:
    """SGLang's cache-aware policy, approximated from the router's own decisions.

    Each replica gets an approximate prefix tree: the block hashes of prompts
    the router sent it (a set of chained hashes is a trie), bounded LRU. If
    load is imbalanced (max - min > `balance_abs` and max > `balance_rel` x min,
    load = running sequences + queued requests) the least loaded replica wins;
    otherwise the best tree match wins if it covers more than
    `match_threshold` of the prompt, else the replica with the smallest tree.
    """

    name = "sglang_like"

    def __init__(
        self,
        balance_abs: int = 32,
        balance_rel: float = 1.5,
        match_threshold: float = 0.5,
        max_tree_blocks: int = 1 << 20,
    ) -> None:
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.match_threshold = match_threshold
        self.max_tree_blocks = max_tree_blocks
        self._trees: dict[str, OrderedDict[BlockHash, None]] = {}

    def _tree(self, replica_id: str) -> OrderedDict[BlockHash, None]:
        return self._trees.setdefault(replica_id, OrderedDict())

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        _require(candidates)
        loads = [
            c.load.active_seqs + (1 if c.load.queued_prefill_tokens else 0) for c in candidates
        ]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs and high > self.balance_rel * low:
            choice = candidates[loads.index(low)].replica_id
        else:
            matches = [
                self._match(self._tree(c.replica_id), request.block_hashes) for c in candidates
            ]
            best = max(matches)
            total = len(request.block_hashes)
            if total and best / total > self.match_threshold:
                choice = candidates[matches.index(best)].replica_id
            else:
                choice = min(candidates, key=lambda c: len(self._tree(c.replica_id))).replica_id
        self._insert(self._tree(choice), request.block_hashes)
        return choice

    @staticmethod
    def _match(tree: OrderedDict[BlockHash, None], hashes: Sequence[BlockHash]) -> int:
        matched = 0
        for block_hash in hashes:
            if block_hash not in tree:
                break
            matched += 1
        return matched

    def _insert(self, tree: OrderedDict[BlockHash, None], hashes: Sequence[BlockHash]) -> None:
        for block_hash in hashes:
            tree[block_hash] = None
            tree.move_to_end(block_hash)
        while len(tree) > self.max_tree_blocks:
            tree.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        """Drop a dead replica's tree."""
        self._trees.pop(replica_id, None)


POLICIES: dict[str, type] = {
    cls.name: cls
    for cls in (KVAware, RoundRobin, RandomChoice, LeastLoaded, PrefixOnly, SGLangLike)
}

# --- Options: one typed struct per policy, so a config is checked when it loads.

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class _Options(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of policy options: unknown keys and wrong types are errors."""


class NoOptions(_Options):
    """The policy takes no options."""


class CostWeightsOptions(_Options):
    prefill_s_per_token: NonNegative = CostWeights.prefill_s_per_token
    decode_s_per_seq: NonNegative = CostWeights.decode_s_per_seq
    kv_usage_s: NonNegative = CostWeights.kv_usage_s
    queue_weight: NonNegative = CostWeights.queue_weight


class KVAwareOptions(_Options):
    weights: CostWeightsOptions = CostWeightsOptions()
    temperature: NonNegative = 0.0
    seed: int = 0


class RandomOptions(_Options):
    seed: int = 0


class SGLangLikeOptions(_Options):
    balance_abs: Annotated[int, msgspec.Meta(ge=0)] = 32
    balance_rel: Annotated[float, msgspec.Meta(ge=1)] = 1.5
    match_threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    max_tree_blocks: Annotated[int, msgspec.Meta(ge=1)] = 1 << 20


POLICY_OPTIONS: dict[str, type[_Options]] = {
    "kv_aware": KVAwareOptions,
    "round_robin": NoOptions,
    "random": RandomOptions,
    "least_loaded": NoOptions,
    "prefix_only": NoOptions,
    "sglang_like": SGLangLikeOptions,
}


def check_policy(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The policy's options, typed and with defaults filled in; ValueError naming
    the policy or the option otherwise."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; expected one of: {', '.join(POLICIES)}")
    try:
        typed = msgspec.convert(options, POLICY_OPTIONS[name])
    except msgspec.ValidationError as exc:
        raise ValueError(f"policy {name!r} options: {exc}") from None
    return msgspec.to_builtins(typed)


def make_policy(name: str, **options: Any) -> RoutingPolicy:
    """Build a policy by its config name; its options are checked first."""
    checked = check_policy(name, options)
    if name == "kv_aware":
        checked["weights"] = CostWeights(**checked["weights"])
    return POLICIES[name](**checked)
