"""Each policy's choice on hand-made situations."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import pytest

from kvroute.replicas.kv_cache.utils import BlockHash
from kvroute.router.policy import (
    Candidate,
    CostWeights,
    KVAware,
    LeastLoaded,
    PrefixOnly,
    RandomChoice,
    ReplicaLoad,
    RoundRobin,
    RouteRequest,
    RoutingPolicy,
    SGLangLike,
    make_policy,
)

PROMPT = RouteRequest(num_tokens=4096)


def _assert_uniform(picks: list[str]) -> None:
    """Each of a, b, c about a third of 3,000 picks, and each ordered pair of
    successive picks about a ninth: a constant choice fails the first, a
    cycle (round robin) the second."""
    counts = Counter(picks)
    assert sorted(counts) == ["a", "b", "c"] and all(900 <= n <= 1100 for n in counts.values())
    pairs = Counter(itertools.pairwise(picks))
    assert len(pairs) == 9 and all(270 <= n <= 400 for n in pairs.values()), pairs


def _assert_seeded_uniform(make: Callable[[int], RoutingPolicy], seed: int) -> None:
    """3,000 picks among a, b, c are uniform; the same seed repeats them, another not."""
    candidates = [_c("a"), _c("b"), _c("c")]

    def picks(policy: RoutingPolicy) -> list[str]:
        return [policy.choose(PROMPT, candidates) for _ in range(3000)]

    first = picks(make(seed))
    _assert_uniform(first)
    assert picks(make(seed)) == first
    assert picks(make(seed + 1)) != first


def _c(name: str, hit: int = 0, queued: int = 0, running: int = 0, usage: float = 0.0) -> Candidate:
    return Candidate(name, hit, ReplicaLoad(queued, running, usage))


def test_kv_aware_prefers_the_hit_when_load_is_equal() -> None:
    policy = KVAware()
    assert policy.choose(PROMPT, [_c("a", 0), _c("b", 2048), _c("c", 1024)]) == "b"


def test_kv_aware_trades_hit_against_queued_prefill() -> None:
    policy = KVAware(CostWeights(prefill_s_per_token=1e-4, decode_s_per_seq=0.0, queue_weight=1))
    # b saves 2048 tokens but has 3000 queued: cost a = 4096, b = 2048 + 3000.
    assert policy.choose(PROMPT, [_c("a", 0), _c("b", 2048, queued=3000)]) == "a"
    assert policy.choose(PROMPT, [_c("a", 0), _c("b", 2048, queued=1000)]) == "b"


def test_by_default_a_prompt_stays_with_its_prefix_under_a_queue_worth_its_hit() -> None:
    policy = KVAware(CostWeights(prefill_s_per_token=1e-4, decode_s_per_seq=0.0))
    # Queued prefill weighs 0.15: b costs 2048 + 0.15 x 3000 = 2498 < a's 4096; only a
    # queue over 2048 / 0.15 tokens sends the prompt away from its prefix.
    assert policy.choose(PROMPT, [_c("a", 0), _c("b", 2048, queued=3000)]) == "b"
    assert policy.choose(PROMPT, [_c("a", 0), _c("b", 2048, queued=13700)]) == "a"


def test_kv_aware_counts_decode_load() -> None:
    policy = KVAware(CostWeights(prefill_s_per_token=1e-4, decode_s_per_seq=0.01))
    # 30 running sequences cost 0.3 s, more than the 0.2048 s the hit saves.
    assert policy.choose(PROMPT, [_c("a", 0), _c("b", 2048, running=30)]) == "a"


def test_kv_aware_cost_is_the_weighted_sum() -> None:
    weights = CostWeights(
        prefill_s_per_token=1e-4, decode_s_per_seq=2e-3, kv_usage_s=0.5, queue_weight=1
    )
    policy = KVAware(weights)
    cost = policy.cost(PROMPT, _c("a", hit=1024, queued=500, running=3, usage=0.5))
    assert cost == pytest.approx(1e-4 * (3072 + 500) + 2e-3 * 3 + 0.25)


def test_kv_aware_breaks_cost_ties_by_load_then_seeded_random() -> None:
    policy = KVAware(CostWeights(prefill_s_per_token=1e-4, decode_s_per_seq=0.0, queue_weight=1))
    # Equal cost (a: 3096 uncached + 1000 queued; b: 4096): the less loaded wins.
    tied = [_c("a", 1000, queued=1000), _c("b", 0, queued=0)]
    assert policy.choose(PROMPT, tied) == "b"
    # Among equal cost and load: a seeded uniform pick, repeated by the same seed.
    _assert_seeded_uniform(lambda seed: KVAware(seed=seed), 3)


def test_kv_aware_softmax_mostly_picks_the_cheapest() -> None:
    policy = KVAware(temperature=0.01, seed=1)
    picks = [policy.choose(PROMPT, [_c("a", 0), _c("b", 4000)]) for _ in range(200)]
    # exp(-0.4 / 0.01) is negligible: b nearly always.
    assert picks.count("b") == 200
    warm = KVAware(temperature=1.0, seed=1)
    picks = [warm.choose(PROMPT, [_c("a", 0), _c("b", 4000)]) for _ in range(400)]
    assert 100 < picks.count("a") < 300
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        KVAware(temperature=-1)


def test_round_robin_cycles_and_random_is_seeded() -> None:
    policy = RoundRobin()
    candidates = [_c("a"), _c("b"), _c("c")]
    assert [policy.choose(PROMPT, candidates) for _ in range(4)] == ["a", "b", "c", "a"]
    _assert_seeded_uniform(lambda seed: RandomChoice(seed=seed), 7)


def test_random_ignores_hits_and_load() -> None:
    policy = RandomChoice(seed=1)
    candidates = [_c("a", hit=4000), _c("b", queued=10**6), _c("c", running=50)]
    picks = [policy.choose(PROMPT, candidates) for _ in range(3000)]
    _assert_uniform(picks)


def test_least_loaded_ignores_hits() -> None:
    assert LeastLoaded().choose(PROMPT, [_c("a", 4000, queued=10), _c("b", 0, queued=5)]) == "b"
    assert LeastLoaded().choose(PROMPT, [_c("a", running=2), _c("b", running=1)]) == "b"


def test_prefix_only_chases_the_longest_hit_whatever_the_load() -> None:
    policy = PrefixOnly()
    assert policy.choose(PROMPT, [_c("a", 100), _c("b", 200, queued=10**6)]) == "b"
    assert policy.choose(PROMPT, [_c("a", 0, queued=9), _c("b", 0, queued=1)]) == "b"


def _hashes(*names: str) -> list[BlockHash]:
    return [BlockHash(n.encode()) for n in names]


def test_sglang_like_follows_its_tree_then_balances() -> None:
    policy = SGLangLike(balance_abs=2, balance_rel=1.5, match_threshold=0.5)
    idle = [_c("a"), _c("b")]
    first = RouteRequest(64, _hashes("p", "q", "r", "s"))
    assert policy.choose(first, idle) == "a"  # empty trees: the smaller (first) tree
    # Same prefix, 3 of 4 blocks match a's tree: follow it.
    again = RouteRequest(64, _hashes("p", "q", "r", "x"))
    assert policy.choose(again, idle) == "a"
    # Nothing matches: the replica with the smaller tree.
    other = RouteRequest(64, _hashes("m", "n"))
    assert policy.choose(other, idle) == "b"
    # Imbalanced (5 vs 0 running): least loaded wins despite the match.
    busy = [_c("a", running=5), _c("b")]
    assert policy.choose(again, busy) == "b"


def test_sglang_like_tree_is_bounded() -> None:
    policy = SGLangLike(max_tree_blocks=3)
    policy.choose(RouteRequest(64, _hashes("a", "b", "c", "d", "e")), [_c("x")])
    assert list(policy._trees["x"]) == _hashes("c", "d", "e")


def test_make_policy_by_name() -> None:
    assert isinstance(make_policy("kv_aware", temperature=0.5), KVAware)
    assert make_policy("sglang_like").name == "sglang_like"
    with pytest.raises(ValueError, match="unknown routing policy 'best'"):
        make_policy("best")
    with pytest.raises(ValueError, match="no replica is available"):
        KVAware().choose(PROMPT, [])
