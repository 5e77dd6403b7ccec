"""`choose` scores arrays; its decisions must be those of the per-candidate scorer.

The oracle here is the scorer as it was written before it was vectorized: a
Python loop over `Candidate`s (cost, ties within 1e-12, least loaded, then a
seeded random pick, or softmax sampling), fed by the core's per-replica
admission rule and `KVIndex.predict`. Both sides draw from generators seeded
alike, so every choice, random ones included, must agree.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from kvroute.events.kv_events import BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.router.core import NoReplicaError, PreparedPrompt, ReplicasBusyError, Router
from kvroute.router.policy import (
    Candidate,
    CostWeights,
    KVAware,
    ReplicaLoad,
    RouteRequest,
    make_policy,
)
from tests.router.test_core import registration, settings


class ReferenceKVAware:
    """kv_aware's choice as one Python step per candidate (the pre-vectorized code)."""

    def __init__(self, weights: CostWeights, temperature: float, seed: int) -> None:
        self.weights = weights
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

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> str:
        def load_key(c: Candidate) -> tuple[int, int]:
            return (c.load.queued_prefill_tokens, c.load.active_seqs)

        costs = [self.cost(request, c) for c in candidates]
        if self.temperature > 0:
            best = min(costs)
            weights = [math.exp(-(c - best) / self.temperature) for c in costs]
            return self._rng.choices(candidates, weights=weights)[0].replica_id
        best_cost = min(costs)
        tied = [c for c, cost in zip(candidates, costs, strict=True) if cost <= best_cost + 1e-12]
        least = min(load_key(c) for c in tied)
        tied = [c for c in tied if load_key(c) == least]
        return tied[0].replica_id if len(tied) == 1 else self._rng.choice(tied).replica_id


def _random_candidates(rng: random.Random, count: int) -> list[Candidate]:
    """Few distinct values, so exact ties (and near ties) are common."""
    return [
        Candidate(
            f"r{i}",
            rng.choice([0, 0, 16, 32, 48]),
            ReplicaLoad(
                queued_prefill_tokens=rng.choice([0, 0, 10, 100, 10_000]),
                running_seqs=rng.choice([0, 1, 2]),
                kv_usage=rng.choice([0.0, 0.25, 0.5]),
                waiting_seqs=rng.choice([0, 0, 1]),
            ),
        )
        for i in range(count)
    ]


WEIGHTS = [
    CostWeights(),
    CostWeights(queue_weight=0.5, kv_usage_s=0.01),
    CostWeights(prefill_s_per_token=1, decode_s_per_seq=0, kv_usage_s=0, queue_weight=1),
]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("temperature", [0.0, 0.005])
def test_kv_aware_chooses_as_the_per_candidate_scorer(
    weights: CostWeights, temperature: float
) -> None:
    rng = random.Random(11)
    new, old = KVAware(weights, temperature, seed=3), ReferenceKVAware(weights, temperature, 3)
    for _ in range(400):
        candidates = _random_candidates(rng, rng.choice([1, 2, 5, 64, 1024]))
        request = RouteRequest(rng.choice([1, 17, 48, 5000]))
        assert new.choose(request, candidates) == old.choose(request, candidates)


def test_kv_aware_refuses_an_empty_candidate_list() -> None:
    with pytest.raises(ValueError, match="no replica is available"):
        KVAware().choose(RouteRequest(4), [])


def _expected(
    core: Router, oracle: ReferenceKVAware, prepared: PreparedPrompt, exclude: set[str]
) -> str | type[Exception]:
    """The pre-vectorized core's choice: open, admitted, predicted, then scored."""
    open_ids = [
        rid for rid, state in core.replicas.items() if rid not in exclude and not state.suspect
    ]
    if not open_ids:
        return NoReplicaError
    limits = core.settings
    loads = {}
    for rid in open_ids:
        state, load = core.replicas[rid], core.replicas[rid].load()
        queued = load.queued_prefill_tokens + prepared.num_tokens
        if state.in_flight == 0 or (
            (
                limits.max_requests_per_replica is None
                or state.in_flight < limits.max_requests_per_replica
            )
            and (
                limits.max_queued_prefill_tokens is None
                or queued <= limits.max_queued_prefill_tokens
            )
        ):
            loads[rid] = load
    if not loads:
        return ReplicasBusyError
    hits = core.index.predict(prepared.prompt, include_predicted=limits.use_predictions)
    candidates = [Candidate(rid, hits.get(rid, 0), load) for rid, load in loads.items()]
    return oracle.choose(
        RouteRequest(prepared.num_tokens, prepared.prompt.block_hashes), candidates
    )


@pytest.mark.parametrize("temperature", [0.0, 0.002])
@pytest.mark.parametrize(
    "limits",
    [{}, {"max_requests_per_replica": 2, "max_queued_prefill_tokens": 60}],
)
def test_router_choose_decides_as_the_per_candidate_core(
    temperature: float, limits: dict[str, int]
) -> None:
    rng = random.Random(5)
    core = Router(settings(**limits), make_policy("kv_aware", temperature=temperature, seed=9))
    oracle = ReferenceKVAware(CostWeights(), temperature, seed=9)
    names = [f"r{i}" for i in range(12)]
    for rid in names:
        core.register(registration(rid))
    prefixes = [tuple(rng.randrange(1, 100) for _ in range(24)) for _ in range(3)]
    in_flight = []
    outcomes: Counter[object] = Counter()
    for step in range(300):
        action = rng.random()
        if action < 0.1:
            rid = rng.choice(names)
            keys = [rng.getrandbits(64) for _ in range(3)]
            core.apply(rid, KVEventBatch(0.0, [_stored(keys)]))
            hashed = core.prepare(PromptKeys(rng.choice(prefixes)), 1).prompt.block_hashes
            core.apply(
                rid, KVEventBatch(0.0, [_stored([int.from_bytes(h[-8:], "big") for h in hashed])])
            )
        elif action < 0.2:
            rid = rng.choice(names)
            core.report_load(
                rid, ReplicaLoad(rng.choice([0, 4, 40]), rng.choice([0, 1]), 0.0, 0, 0)
            )
        elif action < 0.25:
            core.mark_suspect(rng.choice(names), rng.random() < 0.5)
        elif action < 0.28 and step > 100:
            gone = rng.choice(names)
            if core.remove(gone):
                names.remove(gone)
                in_flight = [d for d in in_flight if d.replica_id != gone]
        elif action < 0.31:
            rid = f"n{step}"
            core.register(registration(rid))
            names.append(rid)
        elif action < 0.5 and in_flight:
            core.finish(in_flight.pop(rng.randrange(len(in_flight))), 17, 0)
        else:
            tokens = rng.choice(prefixes)[: rng.randrange(5, 25)]
            prepared = core.prepare(PromptKeys(tokens), 1)
            exclude = set(rng.sample(names, k=min(len(names), rng.choice([0, 0, 0, 1, 3, 99]))))
            expected = _expected(core, oracle, prepared, exclude)
            if isinstance(expected, type):
                with pytest.raises(expected):
                    core.choose(prepared, exclude)
                outcomes[expected] += 1
                continue
            hits = core.index.predict(prepared.prompt, include_predicted=True)
            decision = core.choose(prepared, exclude)
            assert decision.replica_id == expected
            assert decision.predicted_hit_tokens == hits[expected]
            in_flight.append(decision)
            outcomes["hit" if decision.predicted_hit_tokens else "miss"] += 1
    assert outcomes["hit"] > 20 and outcomes["miss"] > 5 and outcomes[NoReplicaError] > 0


def _stored(keys: list[int]) -> BlockStored:
    return BlockStored(keys, None, [0] * (4 * len(keys)), 4, None, "GPU", None, group_idx=0)
