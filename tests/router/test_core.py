"""The transport-free router core: registration, preparation, choice, load, retries."""

from __future__ import annotations

import pytest

from kvroute.events.kv_events import KVEventBatch
from kvroute.replicas.api import InvalidRequestError, ModelLimits
from kvroute.replicas.config import HashingConfig, ModelConfig
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.request import Request, SamplingParams
from kvroute.router.config import RouterConfig
from kvroute.router.core import (
    NoReplicaError,
    Registration,
    ReplicasBusyError,
    Router,
    RouterSettings,
    prompt_tokens,
    router_settings,
)
from kvroute.router.policy import ReplicaLoad, SGLangLike, make_policy
from tests.replicas.conftest import config, full

ALGO, SEED = "sha256", "seed"
LIMITS = ModelLimits(max_model_len=64, vocab_size=100, lora_names=("bot",))
PROMPT = tuple(range(1, 18))  # 4 full blocks of 4 tokens and one more


def settings(**changes: object) -> RouterSettings:
    """The config's defaults, with the tests' hashing and 4-token blocks."""
    fields: dict[str, object] = {"hash_algo": ALGO, "hash_seed": SEED, "hash_block_size": 4}
    fields.update(changes)
    return router_settings(RouterConfig(), HashingConfig(), ModelConfig(), 1, **fields)


def registration(replica_id: str, **changes: object) -> Registration:
    fields: dict[str, object] = {
        "replica_id": replica_id,
        "kv_cache_config": config(64, full(4)),
        "hash_block_size": 4,
        "scheduler_block_size": 4,
        "use_eagle": False,
        "hash_algo": ALGO,
        "hash_seed": SEED,
        "limits": LIMITS,
    }
    fields.update(changes)
    return Registration(**fields)  # type: ignore[arg-type]


def router(*replicas: str, policy: str = "kv_aware", **changes: object) -> Router:
    core = Router(settings(**changes), make_policy(policy))
    for replica_id in replicas:
        core.register(registration(replica_id))
    return core


def serve(core: Router, replica_id: str, tokens: tuple[int, ...]) -> None:
    """Prefill `tokens` on a real block manager and feed its events to the core."""
    manager = KVCacheManager(
        config(64, full(4)), max_model_len=1024, hash_block_size=4, enable_kv_cache_events=True
    )
    request = Request("served", tokens, SamplingParams(max_tokens=1), block_hasher=core.hasher)
    assert manager.allocate_slots(request, request.num_tokens) is not None
    core.apply(replica_id, KVEventBatch(ts=0.0, events=manager.take_events()))


def test_prepare_hashes_once_and_choose_goes_to_the_replica_holding_the_prefix() -> None:
    core = router("a", "b", use_predictions=False)
    serve(core, "b", PROMPT)
    prepared = core.prepare(PromptKeys(PROMPT), max_tokens=4, request_id="r1")
    assert (prepared.request_id, prepared.num_tokens, len(prepared.prompt.block_hashes)) == (
        "r1",
        17,
        4,
    )
    decision = core.choose(prepared)
    assert (decision.replica_id, decision.predicted_hit_tokens, decision.uncached_tokens) == (
        "b",
        16,
        1,
    )
    assert decision.attempt == 1


def test_a_choice_is_pending_load_until_it_finishes() -> None:
    core = router("a", "b", policy="least_loaded")
    prepared = core.prepare(PromptKeys(PROMPT), max_tokens=4)
    decision = core.choose(prepared)
    assert core.loads()[decision.replica_id] == ReplicaLoad(17, 0, 0.0, waiting_seqs=1)
    core.finish(decision, num_prompt_tokens=17, num_cached_tokens=8)
    state = core.replicas[decision.replica_id]
    assert core.loads()[decision.replica_id] == ReplicaLoad(0, 0, 0.0)
    assert (state.in_flight, state.requests, state.prompt_tokens, state.hit_rate) == (
        0,
        1,
        17,
        8 / 17,
    )


def test_a_load_report_replaces_the_pending_count() -> None:
    core = router("a", policy="least_loaded")
    core.choose(core.prepare(PromptKeys(PROMPT), max_tokens=4))
    core.report_load("a", ReplicaLoad(100, 3, 0.5))
    assert core.loads() == {"a": ReplicaLoad(100, 3, 0.5)}


def test_choose_excludes_tried_replicas_and_fails_when_none_is_left() -> None:
    core = router("a", "b", policy="round_robin")
    prepared = core.prepare(PromptKeys(PROMPT), max_tokens=4)
    first = core.choose(prepared)
    core.release(first, prepared, refused=False)
    second = core.choose(prepared, {first.replica_id})
    assert second.replica_id != first.replica_id
    assert second.attempt == 2
    with pytest.raises(NoReplicaError, match="no replica is available"):
        core.choose(prepared, {"a", "b"})


def test_may_retry_allows_one_attempt_plus_max_retries() -> None:
    core = router("a", max_retries=2)
    assert [core.may_retry(n) for n in range(5)] == [True, True, True, False, False]


def test_a_refused_request_drops_its_predictions_at_once() -> None:
    core = router("a", "b")
    prepared = core.prepare(PromptKeys(PROMPT), max_tokens=4)
    decision = core.choose(prepared)
    assert core.index.num_predicted() == 4
    core.release(decision, prepared, refused=True)
    assert core.index.num_predicted() == 0
    assert core.loads()[decision.replica_id] == ReplicaLoad(0, 0, 0.0)


def test_predictions_keep_a_burst_of_one_prefix_together() -> None:
    """No event has arrived yet; the first choice's prediction draws the rest."""
    core = router("a", "b", "c")
    chosen = []
    for _ in range(4):
        for replica_id in core.replicas:
            core.report_load(replica_id, ReplicaLoad())
        chosen.append(core.choose(core.prepare(PromptKeys(PROMPT), max_tokens=1)))
    assert len({d.replica_id for d in chosen}) == 1
    assert [d.predicted_hit_tokens for d in chosen] == [0, 16, 16, 16]


def test_without_predictions_a_burst_spreads_by_load() -> None:
    core = router("a", "b", "c", use_predictions=False)
    chosen = {core.choose(core.prepare(PromptKeys(PROMPT), 1)).replica_id for _ in range(3)}
    assert chosen == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("keys", "max_tokens", "message"),
    [
        (PromptKeys(()), 4, "prompt is empty"),
        (PromptKeys(tuple(range(64))), 4, "prompt has 64 tokens; max_model_len is 64"),
        (PromptKeys((1, 100)), 4, r"token id 100 is outside the vocabulary \[0, 100\)"),
        (PromptKeys((1, -3)), 4, r"token id -3 is outside the vocabulary \[0, 100\)"),
        (PromptKeys((1, 1 << 40)), 4, r"token id 1099511627776 is outside the vocabulary"),
        (PromptKeys((1, 100.5)), 4, r"token id 100.5 is outside the vocabulary"),  # type: ignore[arg-type]
        (PromptKeys(PROMPT, lora_name="nope"), 4, "unknown LoRA adapter 'nope'"),
        (PromptKeys(PROMPT), 0, "max_tokens must be at least 1"),
    ],
)
def test_prepare_refuses_what_the_model_cannot_serve(
    keys: PromptKeys, max_tokens: int, message: str
) -> None:
    core = router("a")
    with pytest.raises(InvalidRequestError, match=message):
        core.prepare(keys, max_tokens)
    assert core.reuse is None or len(core.reuse) == 0


@pytest.mark.parametrize("algo", ["xxh64_tokens", "sha256"])
def test_prepare_hashes_as_the_prompt_keys_do(algo: str) -> None:
    """prepare hashes the uint32 tokens its validation made (a compiled chain reads
    them as they are); the hashes are those of `PromptKeys.hashed_prompt`."""
    core = Router(settings(hash_algo=algo), make_policy("kv_aware"))
    core.register(registration("a", hash_algo=algo))
    keys = PromptKeys(PROMPT)
    prepared = core.prepare(keys, 1)
    expected = keys.hashed_prompt(core.hasher)
    assert prepared.prompt.block_hashes == expected.block_hashes
    assert len(prepared.prompt.block_hashes) == 4
    assert prompt_tokens(PROMPT) is not None
    assert prompt_tokens(PROMPT).tolist() == list(PROMPT)  # type: ignore[union-attr]
    assert prompt_tokens(()) is None
    assert prompt_tokens((1, -1)) is None


def test_lora_and_salt_enter_the_prompt_hashes() -> None:
    core = router("a")
    plain = core.prepare(PromptKeys(PROMPT), 1).prompt.block_hashes
    lora = core.prepare(PromptKeys(PROMPT, lora_name="bot"), 1).prompt.block_hashes
    salted = core.prepare(PromptKeys(PROMPT, cache_salt="t1"), 1).prompt.block_hashes
    assert len({plain[0], lora[0], salted[0]}) == 3


def test_reuse_hint_counts_the_tokens_seen_in_earlier_prompts() -> None:
    core = router("a", reuse_memory=2.0, cluster_blocks=64)
    assert core.prepare(PromptKeys(PROMPT), 1).reuse_hint_tokens == 0
    assert core.prepare(PromptKeys(PROMPT[:9] + (99,) * 8), 1).reuse_hint_tokens == 8


def test_remove_forgets_the_replica_in_the_index_and_the_policy() -> None:
    policy = SGLangLike()
    core = Router(settings(), policy)
    core.register(registration("a"))
    core.register(registration("b"))
    prepared = core.prepare(PromptKeys(PROMPT), 1)
    chosen = core.choose(prepared).replica_id
    assert core.remove(chosen) is True
    assert core.remove(chosen) is False
    assert chosen not in core.replicas and chosen not in core.index.replica_ids
    assert chosen not in policy._trees
    other = core.choose(prepared)
    assert other.replica_id != chosen


def test_a_replica_with_another_hash_seed_is_refused_at_registration() -> None:
    core = router("a")
    with pytest.raises(ValueError, match="seed 'other'"):
        core.register(registration("b", hash_seed="other"))
    assert list(core.replicas) == ["a"]


def test_resync_replaces_what_the_index_knew() -> None:
    core = router("a", "b", use_predictions=False)
    serve(core, "a", PROMPT)
    core.resync("a", KVEventBatch(ts=0.0, events=[]))
    assert core.index.predict(PromptKeys(PROMPT)) == {"a": 0, "b": 0}


def test_a_replica_at_its_request_limit_is_skipped_for_one_under_it() -> None:
    core = router("a", "b", policy="round_robin", max_requests_per_replica=1)
    first = core.choose(core.prepare(PromptKeys(PROMPT), 1))
    second = core.choose(core.prepare(PromptKeys(PROMPT), 1))
    assert {first.replica_id, second.replica_id} == {"a", "b"}


def test_with_every_replica_full_the_core_sheds_load_instead_of_queueing() -> None:
    core = router("a", "b", max_requests_per_replica=1, retry_after_s=2.0)
    prepared = core.prepare(PromptKeys(PROMPT), 1)
    decisions = [core.choose(prepared), core.choose(prepared)]
    with pytest.raises(ReplicasBusyError, match="all 2 replicas are at their admission limit"):
        core.choose(prepared)
    core.finish(decisions[0], 17, 0)
    assert core.choose(prepared).replica_id == decisions[0].replica_id


def test_queued_prefill_tokens_are_bounded_but_an_idle_replica_takes_any_prompt() -> None:
    core = router("a", max_queued_prefill_tokens=20)
    prepared = core.prepare(PromptKeys(PROMPT), 1)
    core.choose(prepared)  # idle: admitted, 17 tokens now queued
    with pytest.raises(ReplicasBusyError):
        core.choose(prepared)  # 17 + 17 > 20
    core.report_load("a", ReplicaLoad(0, 1, 0.0))
    assert core.choose(prepared).replica_id == "a"  # 0 + 17 <= 20


def test_a_suspect_replica_gets_no_new_requests_until_it_answers() -> None:
    core = router("a", "b", policy="round_robin")
    core.mark_suspect("a", True)
    prepared = core.prepare(PromptKeys(PROMPT), 1)
    assert {core.choose(prepared).replica_id for _ in range(3)} == {"b"}
    core.mark_failing("b", True)
    core.mark_suspect("a", False)
    assert {core.choose(prepared).replica_id for _ in range(3)} == {"a"}


def test_when_every_replica_looks_stale_the_router_trusts_its_own_accounting() -> None:
    """All suspect at once (the router's own stall, or a starved machine) is no 503:
    requests still go out, admitted by the router's count of requests in flight."""
    core = router("a", "b", policy="round_robin", max_requests_per_replica=1)
    core.mark_suspect("a", True)
    core.mark_failing("b", True)
    prepared = core.prepare(PromptKeys(PROMPT), 1)
    assert sorted(core.choose(prepared).replica_id for _ in range(2)) == ["a", "b"]
    with pytest.raises(ReplicasBusyError):
        core.choose(prepared)
    with pytest.raises(NoReplicaError, match="no replica is available"):
        core.choose(prepared, exclude={"a", "b"})
