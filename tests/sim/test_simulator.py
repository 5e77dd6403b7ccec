"""The simulator on a hand-checked workload: exact hit counts, lossy events, determinism."""

from __future__ import annotations

import pytest

from kvroute.benchmarks.sim.metrics import summarize
from kvroute.benchmarks.sim.simulator import SimConfig, SimResult, Simulator
from kvroute.benchmarks.sim.workload import ContentBlock, PromptSpec, SimRequest, Workload
from kvroute.replicas.config import (
    CostConfig,
    EventsConfig,
    GroupConfig,
    HashingConfig,
    ModelConfig,
    ReplicasConfig,
    ReplicaSettings,
)

SETTINGS = ReplicaSettings(
    model=ModelConfig(block_size=16, num_blocks=4096, groups=[GroupConfig(kind="full_attention")]),
    hashing=HashingConfig(algo="xxhash", seed="sim-test"),
    replicas=ReplicasConfig(cost=CostConfig(prefill_tokens_per_s=10_000.0)),
    events=EventsConfig(),
)


def tenant_workload(tenants: int = 6, rounds: int = 50) -> Workload:
    """`rounds` passes over the tenants, one request per second, each a tenant's
    64-token system prompt (4 blocks) plus a unique 32-token question."""
    requests = []
    for i in range(tenants * rounds):
        prompt = PromptSpec((ContentBlock(f"system-{i % tenants}", 64), ContentBlock(f"q-{i}", 32)))
        requests.append(SimRequest(f"r{i}", prompt, max_tokens=8, arrival_s=float(i)))
    return Workload("tenants", requests)


def run(policy: str, drop_rate: float = 0.0, seed: int = 0) -> SimResult:
    config = SimConfig(
        settings=SETTINGS, replicas=2, policy=policy, event_drop_rate=drop_rate, seed=seed
    )
    return Simulator(config, tenant_workload()).run(progress=False)


def test_every_request_after_a_tenants_first_hits_its_system_prompt() -> None:
    result = run("kv_aware")
    records = result.records
    assert len(records) == 300
    # The first request of each of the 6 tenants misses; the other 294 hit
    # exactly the 64-token system prompt (the questions never repeat).
    assert sum(r.cached_tokens for r in records) == 294 * 64
    assert sorted({r.cached_tokens for r in records}) == [0, 64]
    assert [r.predicted_tokens for r in records] == [r.cached_tokens for r in records]
    # Requests a second apart: each finishes before the next arrives, so a
    # tenant keeps its replica and no block is ever cached twice.
    assert result.duplication == 1.0
    metrics = summarize(result)
    assert metrics.hit_rate == pytest.approx(294 * 64 / (300 * 96))


def test_round_robin_caches_every_tenant_on_both_replicas() -> None:
    result = run("round_robin")
    # Request i goes to replica i % 2 and belongs to tenant i % 6, so each
    # tenant always lands on the same replica: the same 294 hits as kv_aware.
    assert sum(r.cached_tokens for r in result.records) == 294 * 64
    assert {r.replica_id for r in result.records} == {"r0", "r1"}


def test_lost_events_are_replayed_and_routing_stays_exact() -> None:
    result = run("kv_aware", drop_rate=0.3, seed=1)
    assert sum(r.cached_tokens for r in result.records) == 294 * 64
    assert [r.predicted_tokens for r in result.records] == [r.cached_tokens for r in result.records]
    streams = [rec.stream for rec in result.replicas.values()]
    assert all(s is not None and s.gaps > 0 and s.state.value == "exact" for s in streams)


def test_a_seed_reproduces_the_run() -> None:
    first = run("random", seed=3)
    again = run("random", seed=3)
    assert [(r.replica_id, r.first_token_s) for r in first.records] == [
        (r.replica_id, r.first_token_s) for r in again.records
    ]


def _prefix_then_floods() -> Workload:
    """A 64-token prefix asked three times, each time after three one-off
    prompts that together outgrow a 16-block cache; one request per second."""
    prompts = []
    for visit in range(3):
        prompts.append((ContentBlock("prefix", 64), ContentBlock(f"question-{visit}", 32)))
        prompts += [(ContentBlock(f"one-off-{visit}-{k}", 96),) for k in range(3)]
    requests = [
        SimRequest(f"r{i}", PromptSpec(blocks), max_tokens=1, arrival_s=float(i))
        for i, blocks in enumerate(prompts)
    ]
    return Workload("prefix-then-floods", requests)


@pytest.mark.parametrize(
    ("probation_fraction", "reuse_memory", "prefix_hits"),
    [(None, 0.0, [0, 0, 0]), (0.6, 0.0, [0, 0, 0]), (0.6, 4.0, [0, 0, 64])],
    ids=["lru", "segmented-lru", "segmented-lru+router-hints"],
)
def test_router_reuse_hints_keep_a_returning_prefix_through_a_flood(
    probation_fraction: float | None, reuse_memory: float, prefix_hits: list[int]
) -> None:
    settings = ReplicaSettings(
        model=ModelConfig(
            block_size=16, num_blocks=17, groups=[GroupConfig(kind="full_attention")]
        ),
        hashing=HashingConfig(algo="xxhash", seed="sim-test"),
        replicas=ReplicasConfig(probation_fraction=probation_fraction),
        events=EventsConfig(),
    )
    config = SimConfig(settings=settings, replicas=1, reuse_memory=reuse_memory)
    result = Simulator(config, _prefix_then_floods()).run(progress=False)
    records = {r.request_id: r for r in result.records}
    # The prefix's second visit is a miss everywhere (the first flood evicted
    # it), but only the router knows it was seen before: its hint protects the
    # recomputed prefix from the second flood, so the third visit hits.
    assert [records[f"r{4 * visit}"].cached_tokens for visit in range(3)] == prefix_hits
    assert sum(r.cached_tokens for r in result.records) == sum(prefix_hits)
    assert [r.predicted_tokens for r in result.records] == [r.cached_tokens for r in result.records]
