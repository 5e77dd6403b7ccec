"""The simulator with a tier of routers: exact hit counts on hand-checked bursts."""

from __future__ import annotations

import hashlib

import pytest

from kvroute.benchmarks.sim.generators import multi_tenant, multi_turn_chat
from kvroute.benchmarks.sim.simulator import SimConfig, SimResult, Simulator
from kvroute.benchmarks.sim.workload import ContentBlock, PromptSpec, SimRequest, Workload
from tests.sim.test_simulator import SETTINGS

QUEUE_WEIGHT = {"weights": {"queue_weight": 0.15}}


def bursts(gap_s: float = 0.0) -> Workload:
    """Two rounds over 4 tenants, a tenant a second; each tenant sends a burst of 4
    requests `gap_s` apart: its 256-token system prompt (16 blocks) and a unique
    16-token question. Each burst is done long before the next."""
    requests = []
    for slot in range(8):
        for k in range(4):
            i = len(requests)
            prompt = PromptSpec(
                (ContentBlock(f"system-{slot % 4}", 256), ContentBlock(f"q-{i}", 16))
            )
            requests.append(SimRequest(f"r{i}", prompt, 4, arrival_s=slot + k * gap_s))
    return Workload("bursts", requests)


def run(workload: Workload, routers: int = 1, **changes: object) -> SimResult:
    fields: dict[str, object] = {
        "settings": SETTINGS,
        "replicas": 2,
        "routers": routers,
        "policy_options": QUEUE_WEIGHT,
    }
    fields.update(changes)
    return Simulator(SimConfig(**fields), workload).run(progress=False)  # type: ignore[arg-type]


def hits(result: SimResult) -> int:
    return sum(r.cached_tokens for r in result.records)


def placement(result: SimResult) -> list[tuple[str, str, int]]:
    return sorted((r.request_id, r.replica_id, r.cached_tokens) for r in result.records)


def fingerprint(result: SimResult) -> str:
    rows = [
        (
            r.request_id,
            r.replica_id,
            r.cached_tokens,
            r.predicted_tokens,
            repr(r.first_token_s),
            repr(r.finish_s),
        )
        for r in result.records
    ]
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("name", "drop_rate", "expected", "cached"),
    [
        ("tenants", 0.0, "fc6b6ce8fcb7589b", 48896),
        ("tenants", 0.3, "fc6b6ce8fcb7589b", 48896),
        ("chat", 0.0, "a73e8ce5504f5e5a", 5536),
        ("chat", 0.3, "a73e8ce5504f5e5a", 5536),
    ],
)
@pytest.mark.parametrize("share", [False, True], ids=["alone", "sharing-with-nobody"])
def test_one_router_is_the_single_router_simulator_exactly(
    name: str, drop_rate: float, expected: str, cached: int, share: bool
) -> None:
    """The fingerprints are those of the simulator before it had a tier (commit f4490d9):
    every record's replica, hit, prediction, first-token and finish time."""
    workload = {
        "tenants": multi_tenant(
            tenants=6,
            requests=200,
            system_prompt_tokens=256,
            question_tokens=32,
            output_tokens=8,
            rate=50.0,
            seed=1,
        ),
        "chat": multi_turn_chat(
            sessions=20,
            turns=3,
            system_tokens=64,
            user_tokens=32,
            output_tokens=8,
            think_s=0.05,
            rate=20.0,
            seed=2,
        ),
    }[name]
    config = SimConfig(
        settings=SETTINGS,
        replicas=3,
        event_drop_rate=drop_rate,
        seed=5,
        share_decisions=share,
        # The weight kv_aware had by default when these fingerprints were taken.
        policy_options={"weights": {"queue_weight": 1.0}},
    )
    result = Simulator(config, workload).run(progress=False)
    assert (fingerprint(result), hits(result)) == (expected, cached)
    assert result.routed == [len(workload.requests)] and result.peer_decisions == [0]


def test_one_router_keeps_every_burst_together() -> None:
    # 32 requests; each tenant's first misses, the other 28 hit the system prompt.
    result = run(bursts())
    assert hits(result) == 28 * 256
    assert result.duplication == 1.0


@pytest.mark.parametrize("routers", [2, 4])
def test_with_zero_latencies_and_sharing_a_tier_routes_as_one_router(routers: int) -> None:
    alone = run(bursts(), event_delay_s=0.0)
    tier = run(bursts(), routers, event_delay_s=0.0, share_decisions=True)
    assert hits(tier) == hits(alone) == 28 * 256
    assert placement(tier) == placement(alone)
    assert tier.routed == [32 // routers] * routers
    assert tier.peer_decisions == [32 - 32 // routers] * routers


@pytest.mark.parametrize("routers", [2, 4])
def test_without_sharing_a_burst_splits_over_the_routers(routers: int) -> None:
    """Round-robin ingress gives a burst's requests to alternating routers; each only
    knows its own predictions, and load sends the other half to the other replica:
    two misses per tenant in round one, and every system prompt cached twice."""
    result = run(bursts(), routers)
    assert hits(result) == 24 * 256
    assert result.duplication == pytest.approx(160 / 96)
    assert result.peer_decisions == [0] * routers


@pytest.mark.parametrize(
    ("decision_delay_s", "expected_hits"),
    [(0.0, 28 * 256), (0.0005, 28 * 256), (0.002, 24 * 256)],
)
def test_a_decision_helps_only_if_it_lands_before_the_next_arrival(
    decision_delay_s: float, expected_hits: int
) -> None:
    """A burst's requests 1 ms apart, events 5 ms late: only the peer's decision can
    keep request 2 of a burst with request 1, if it is faster than the 1 ms gap."""
    result = run(bursts(gap_s=0.001), 2, share_decisions=True, decision_delay_s=decision_delay_s)
    assert hits(result) == expected_hits


def test_random_ingress_is_seeded() -> None:
    first = run(bursts(), 4, ingress="random", seed=7)
    again = run(bursts(), 4, ingress="random", seed=7)
    assert first.routed == again.routed and sum(first.routed) == 32
    assert len(set(first.routed)) > 1  # not round robin
    assert placement(first) == placement(again)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"routers": 0}, "routers must be >= 1"),
        ({"ingress": "sticky"}, "ingress 'sticky'"),
        ({"decision_delay_s": -1.0}, "decision_delay_s must be >= 0"),
    ],
)
def test_a_bad_tier_config_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(settings=SETTINGS, **changes)  # type: ignore[arg-type]
