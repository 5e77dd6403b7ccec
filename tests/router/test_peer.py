"""Peer decisions: a router records another router's choice as its own prediction."""

from __future__ import annotations

import msgspec
import pytest

from kvroute.replicas.api import ReplicaLoad
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.router.core import Router
from kvroute.router.policy import make_policy
from kvroute.router.tier.peer import DecisionOrigin, PeerDecision, PeerDecisionCodec
from tests.replicas.conftest import config, full, swa
from tests.router.test_core import PROMPT, registration, serve, settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tier(
    *replicas: str, clock: Clock, hybrid: bool = False, **changes: object
) -> tuple[Router, Router]:
    """Routers A and B over the same replicas and clock, with 2 s prediction TTL."""
    routers = []
    for _ in range(2):
        core = Router(settings(prediction_ttl_s=2.0, **changes), make_policy("kv_aware"), clock)
        for replica_id in replicas:
            layout = config(64, full(4), swa(8, 8)) if hybrid else config(64, full(4))
            core.register(registration(replica_id, kv_cache_config=layout))
        routers.append(core)
    return routers[0], routers[1]


def share(a: Router, replica: str | None = None) -> tuple[str, PeerDecision]:
    """A routes PROMPT (or is told `replica`'s choice) and encodes its PeerDecision."""
    prepared = a.prepare(PromptKeys(PROMPT), max_tokens=1)
    chosen = a.choose(prepared).replica_id
    peer = DecisionOrigin("router-a", wall_clock=lambda: 7.5).decision(
        replica or chosen, prepared.prompt
    )
    codec = PeerDecisionCodec()
    return chosen, codec.decode(codec.encode(peer))


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "full+window"])
def test_a_peer_decision_gives_b_the_prediction_a_made(hybrid: bool) -> None:
    clock = Clock()
    a, b = tier("r0", "r1", "r2", clock=clock, hybrid=hybrid)
    chosen, peer = share(a)
    assert (peer.router_id, peer.seq, peer.replica_id, peer.hash_block_size, peer.ts) == (
        "router-a",
        0,
        chosen,
        4,
        7.5,
    )
    assert len(peer.block_keys) == 4  # the 4 full blocks of the 17-token prompt
    before = b.loads()
    # 4 full-attention blocks, plus 2 window blocks of 8 tokens in the hybrid layout.
    assert b.apply_peer(peer) == (6 if hybrid else 4)
    expected = {rid: (16 if rid == chosen else 0) for rid in ("r0", "r1", "r2")}
    assert a.index.predict(PromptKeys(PROMPT), include_predicted=True) == expected
    assert b.index.predict(PromptKeys(PROMPT), include_predicted=True) == expected
    assert b.index.num_predicted() == a.index.num_predicted() == (6 if hybrid else 4)
    # B's own pending load is untouched; the replica's next report counts the request.
    assert b.loads() == before
    assert all(state.in_flight == 0 for state in b.replicas.values())
    assert b.index.stats.peer_decisions == 1


def test_b_then_routes_the_same_prompt_where_a_sent_it() -> None:
    clock = Clock()
    a, b = tier("r0", "r1", "r2", clock=clock)
    chosen, peer = share(a)
    b.apply_peer(peer)
    for replica_id in b.replicas:
        b.report_load(replica_id, ReplicaLoad())
    decision = b.choose(b.prepare(PromptKeys(PROMPT), max_tokens=1))
    assert (decision.replica_id, decision.predicted_hit_tokens) == (chosen, 16)


def test_a_peer_prediction_expires_after_the_ttl() -> None:
    clock = Clock()
    a, b = tier("r0", "r1", clock=clock)
    chosen, peer = share(a)
    clock.now += 1.0  # received a second after A chose: B's TTL counts from now
    b.apply_peer(peer)
    clock.now += 1.999
    assert b.index.predict(PromptKeys(PROMPT), include_predicted=True)[chosen] == 16
    clock.now += 0.001
    assert b.index.predict(PromptKeys(PROMPT), include_predicted=True)[chosen] == 0
    assert (b.index.num_predicted(), b.index.stats.predictions_expired) == (0, 4)


def test_a_later_block_stored_settles_a_peer_prediction() -> None:
    clock = Clock()
    a, b = tier("r0", "r1", clock=clock)
    chosen, peer = share(a)
    b.apply_peer(peer)
    serve(b, chosen, PROMPT)
    assert b.index.num_predicted() == 0
    assert b.index.stats.predictions_confirmed == 4
    clock.now += 10.0  # confirmed: the TTL no longer matters
    assert b.index.predict(PromptKeys(PROMPT), include_predicted=True)[chosen] == 16


def test_blocks_b_already_holds_are_not_predicted_again() -> None:
    clock = Clock()
    a, b = tier("r0", "r1", clock=clock)
    serve(b, "r1", PROMPT[:9])  # 2 of the 4 blocks confirmed on r1
    _, peer = share(a, replica="r1")
    assert b.apply_peer(peer) == 2


def test_an_unknown_replica_or_hash_block_size_is_ignored_and_counted() -> None:
    clock = Clock()
    a, b = tier("r0", "r1", clock=clock)
    _, peer = share(a)
    assert b.apply_peer(msgspec.structs.replace(peer, replica_id="r9")) == 0
    assert b.apply_peer(msgspec.structs.replace(peer, hash_block_size=8)) == 0
    stats = b.index.stats
    assert (stats.peer_unknown_replica, stats.peer_mismatched, stats.peer_decisions) == (1, 1, 0)
    assert b.index.num_predicted() == 0


def test_with_predictions_off_peer_decisions_are_not_recorded() -> None:
    clock = Clock()
    a, b = tier("r0", "r1", clock=clock, use_predictions=False)
    _, peer = share(a)
    assert b.apply_peer(peer) == 0
    assert b.index.num_predicted() == 0


def test_the_codec_refuses_malformed_decisions() -> None:
    codec = PeerDecisionCodec()
    good = PeerDecision("a", 0, "r0", 4, [0, (1 << 64) - 1], 1.0)
    assert codec.decode(codec.encode(good)) == good
    bad = [
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode(["a", 0, "r0", 4, [-1], 1.0]),  # key outside uint64
        msgspec.msgpack.encode(["a", 0, "r0", 4, ["k"], 1.0]),  # key not an int
        msgspec.msgpack.encode(["a", -1, "r0", 4, [], 1.0]),  # negative seq
        msgspec.msgpack.encode(["", 0, "r0", 4, [], 1.0]),  # empty router id
        msgspec.msgpack.encode(["a", 0, "r0", 0, [], 1.0]),  # block size 0
        msgspec.msgpack.encode(["a", 0, "r0", 4, [], 1.0, "extra"]),
    ]
    for payload in bad:
        with pytest.raises(msgspec.DecodeError):
            codec.decode(payload)


def test_an_origin_numbers_its_decisions_from_zero() -> None:
    core = Router(settings(), make_policy("kv_aware"))
    core.register(registration("r0"))
    origin = DecisionOrigin("a")
    prompt = core.prepare(PromptKeys(PROMPT), 1).prompt
    assert [origin.decision("r0", prompt).seq for _ in range(3)] == [0, 1, 2]
