"""The decision channel over real loopback sockets, with and without CURVE.

Every "receives nothing" test has a positive control beside it on the same
publisher, so the silence is CURVE's doing and not a slow connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq

from kvroute.events.curve import CurveKeyPair
from kvroute.events.errors import MalformedKind
from kvroute.replicas.kv_cache.prompt import HashedPrompt, PromptKeys
from kvroute.router.core import Router
from kvroute.router.policy import make_policy
from kvroute.router.tier.decisions import (
    BEAT_TOPIC,
    TOPIC,
    DecisionChannel,
    DecisionChannelConfig,
)
from kvroute.router.tier.peer import PeerBeat, PeerDecision
from tests.router.test_core import PROMPT, registration, settings

pytestmark = pytest.mark.timeout(60)

WAIT_S = 20.0


def decision(router_id: str, seq: int, replica_id: str = "r0") -> PeerDecision:
    return PeerDecision(router_id, seq, replica_id, 4, [1, 2, 3], 0.0)


class Inbox:
    def __init__(self) -> None:
        self.got: list[PeerDecision] = []

    def __call__(self, peer: PeerDecision) -> None:
        self.got.append(peer)


def channel(name: str, inbox: Inbox, keys: CurveKeyPair | None = None) -> DecisionChannel:
    ch = DecisionChannel(name, inbox, DecisionChannelConfig(curve=keys))
    ch.start()
    return ch


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def connected(sender: DecisionChannel, inbox: Inbox) -> int:
    """Publish until `inbox` has a decision (SUB joins late); the next seq to send."""
    deadline = time.monotonic() + WAIT_S
    while not inbox.got:
        if time.monotonic() > deadline:
            raise AssertionError("the peer never received a decision")
        sender.publish(decision(sender.router_id, sender.origin.next_seq))
        sender.origin.next_seq += 1
        await asyncio.sleep(0.01)
    return sender.origin.next_seq


def test_two_routers_share_decisions_and_b_predicts_what_a_chose() -> None:
    async def scenario() -> None:
        cores = []
        for _ in range(2):
            core = Router(settings(), make_policy("kv_aware"))
            for replica_id in ("r0", "r1", "r2"):
                core.register(registration(replica_id))
            cores.append(core)
        a_core, b_core = cores
        a_got, b_got = Inbox(), Inbox()
        a, b = channel("a", a_got), channel("b", b_got)
        try:
            a.add_peer("b", b.endpoint)
            b.add_peer("a", a.endpoint)
            assert a.endpoint.startswith("tcp://127.0.0.1:")
            await connected(a, b_got)
            await connected(b, a_got)
            prepared = a_core.prepare(PromptKeys(PROMPT), max_tokens=1)
            chosen = a_core.choose(prepared).replica_id
            assert a.share(chosen, prepared.prompt)
            await until(
                lambda: (
                    b_got.got[-1].replica_id == chosen and b_got.got[-1].block_keys != [1, 2, 3]
                ),
                "A's decision at B",
            )
            peer = b_got.got[-1]
            assert b_core.apply_peer(peer) == 4
            expected = {rid: (16 if rid == chosen else 0) for rid in ("r0", "r1", "r2")}
            assert b_core.index.predict(PromptKeys(PROMPT), include_predicted=True) == expected
            # After the first delivery, nothing is lost on loopback, in order.
            assert [d.seq for d in b_got.got] == list(range(b_got.got[0].seq, peer.seq + 1))
            assert b.stats.lost == 0 and b.stats.received == len(b_got.got)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_with_curve_the_routers_key_receives_and_a_wrong_key_gets_nothing() -> None:
    async def scenario() -> None:
        routers = CurveKeyPair.generate()
        a_got, b_got, stranger_got, plain_got = Inbox(), Inbox(), Inbox(), Inbox()
        a = channel("a", a_got, routers)
        b = channel("b", b_got, routers)
        stranger = channel("stranger", stranger_got, CurveKeyPair.generate())
        plain = channel("plain", plain_got)
        try:
            b.add_peer("a", a.endpoint)
            # The stranger knows A's public key, but its own key is not the routers'.
            stranger.add_peer("a", a.endpoint, server_key=routers.public_key)
            plain.add_peer("a", a.endpoint)
            next_seq = await connected(a, b_got)
            for seq in range(next_seq, next_seq + 20):
                a.publish(decision("a", seq))
            await until(lambda: b_got.got[-1].seq == next_seq + 19, "20 decisions at B")
            await asyncio.sleep(0.2)
            assert stranger_got.got == [] and plain_got.got == []
            assert stranger.stats.received == plain.stats.received == 0
        finally:
            for ch in (a, b, stranger, plain):
                await ch.close()

    asyncio.run(scenario())


def test_control_without_curve_the_same_keyless_receiver_gets_decisions() -> None:
    async def scenario() -> None:
        a_got, plain_got = Inbox(), Inbox()
        a, plain = channel("a", a_got), channel("plain", plain_got)
        try:
            plain.add_peer("a", a.endpoint)
            await connected(a, plain_got)
        finally:
            await a.close()
            await plain.close()

    asyncio.run(scenario())


def test_malformed_frames_are_counted_and_dropped_and_the_channel_goes_on() -> None:
    async def scenario() -> None:
        got = Inbox()
        receiver = channel("b", got)
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        try:
            receiver.add_peer("raw", f"tcp://127.0.0.1:{port}")
            seq = 0
            deadline = time.monotonic() + WAIT_S
            while not got.got:  # until the SUB has joined
                assert time.monotonic() < deadline
                pub.send_multipart([TOPIC, msgspec.msgpack.encode(decision("a", seq))])
                seq += 1
                await asyncio.sleep(0.01)
            pub.send_multipart([TOPIC])  # one frame
            pub.send_multipart([TOPIC, b"\xc1"])  # not msgpack
            pub.send_multipart([TOPIC, msgspec.msgpack.encode(["a", "zero", "r0", 4, [], 0.0])])
            pub.send_multipart([TOPIC, b"\x00" * (10 << 20)])  # oversized
            pub.send_multipart([TOPIC, msgspec.msgpack.encode(decision("a", seq))])
            await until(lambda: got.got[-1].seq == seq, "the good decision after the bad ones")
            assert receiver.stats.malformed == {
                MalformedKind.FRAME_COUNT: 1,
                MalformedKind.NOT_MSGPACK: 1,
                MalformedKind.WRONG_TYPE: 1,
                MalformedKind.OVERSIZED_PAYLOAD: 1,
            }
        finally:
            pub.close()
            ctx.term()
            await receiver.close()

    asyncio.run(scenario())


def frames(peer: PeerDecision) -> list[bytes]:
    return [TOPIC, msgspec.msgpack.encode(peer)]


def test_seq_gaps_restarts_own_decisions_and_failing_callbacks_are_counted() -> None:
    async def scenario() -> None:
        got = Inbox()
        receiver = DecisionChannel("b", got)
        try:
            for seq in (0, 1, 4, 5, 0):  # 2 and 3 lost; then the sender restarted
                receiver.on_frames(frames(decision("a", seq)))
            receiver.on_frames(frames(decision("b", 0)))  # its own
            stats = receiver.stats
            assert (stats.received, stats.lost, stats.restarts, stats.own) == (5, 2, 1, 1)

            def fail(peer: PeerDecision) -> None:
                raise RuntimeError("boom")

            failing = DecisionChannel("c", fail)
            try:
                assert failing.on_frames(frames(decision("a", 0))) is not None
                assert failing.stats.callback_errors == 1
            finally:
                await failing.close()
        finally:
            await receiver.close()

    asyncio.run(scenario())


def beat(router_id: str, next_seq: int) -> list[bytes]:
    return [BEAT_TOPIC, msgspec.msgpack.encode(PeerBeat(router_id, next_seq))]


def test_a_beat_sets_the_baseline_reveals_a_lost_tail_and_a_restart() -> None:
    async def scenario() -> None:
        receiver = DecisionChannel("b", Inbox())
        try:
            receiver.on_frames(beat("a", 7))  # joined late: seqs 0-6 were never ours
            receiver.on_frames(frames(decision("a", 7)))
            receiver.on_frames(beat("a", 8))  # repeats what we saw: nothing lost
            receiver.on_frames(beat("a", 11))  # 8, 9 and 10 sent, none arrived
            receiver.on_frames(beat("a", 0))  # restarted, nothing sent yet
            receiver.on_frames(frames(decision("a", 0)))
            receiver.on_frames(beat("b", 3))  # its own
            stats = receiver.stats
            assert (stats.received, stats.beats, stats.lost, stats.restarts) == (2, 4, 3, 1)
            assert stats.own == 0
        finally:
            await receiver.close()

    asyncio.run(scenario())


def test_a_peer_is_live_once_its_beats_arrive_and_not_after_it_is_removed() -> None:
    async def scenario() -> None:
        a_got, b_got = Inbox(), Inbox()
        a = DecisionChannel("a", a_got, DecisionChannelConfig(beat_s=0.02))
        b = channel("b", b_got)
        a.start()
        try:
            b.add_peer("a", a.endpoint)
            assert b.live_peers == []
            await until(lambda: b.live_peers == ["a"], "A's beats at B")
            # Live means subscribed: the very next decision arrives, with none lost.
            assert a.share("r0", a_core_prompt()) is True
            await until(lambda: len(b_got.got) == 1, "the first decision at B")
            assert b_got.got[0].seq == 0 and b.stats.lost == 0
            b.remove_peer("a")
            assert b.live_peers == [] and b.peers == {}
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def a_core_prompt() -> HashedPrompt:
    core = Router(settings(), make_policy("kv_aware"))
    core.register(registration("r0"))
    return core.prepare(PromptKeys(PROMPT), max_tokens=1).prompt
