"""The decision channel: routers of a tier tell each other where they sent what.

Each router binds one PUB socket and connects one SUB socket to every peer's PUB.
A message is two frames, `[TOPIC, msgpack PeerDecision]`; the receiver applies it
with `Router.apply_peer`, so a burst of one conversation split over several
routers still lands on one replica. Every `beat_s` each router also publishes
`[BEAT_TOPIC, msgpack PeerBeat]`: a peer is *live* once anything of it arrived,
since a SUB joins a PUB late and silently and decisions sent before then are
never seen.

Threading. Sends happen on the router's event loop, right after `Router.choose`:
a NOBLOCK send on PUB only hands the frames to ZeroMQ's I/O thread, so routing
never waits on the network. Receives run as one task on the same loop
(`zmq.asyncio`): peer decisions must be applied on the loop anyway, because the
index has a single thread, so a receiver thread would only add a hop
(`call_soon_threadsafe`) per message and a thread per router.

Loss rules. Decisions are hints with a TTL, never repaired:
- A send that ZeroMQ refuses is dropped and counted (`send_dropped`). PUB itself
  drops silently for a peer past its high-water mark, so every decision carries
  its sender's seq and the receiver counts the seqs it never saw (`lost`); the
  beat's next seq reveals a lost tail. Decisions sent before a receiver's
  subscription was live are not counted: they were never meant for it.
- A malformed message (frame layout, size, msgpack, types) is counted per
  `MalformedKind`, logged once per kind, and dropped; an exception in the
  consumer is counted and logged once. Nothing that arrives stops the task.

Security. With `curve` (the routers' shared key pair, the one the replicas'
event sockets accept) the PUB is a CURVE server admitting only that public key,
and the SUB a CURVE client of each peer's public key (by default the same one).
Without it the default endpoint is loopback; a non-loopback bind is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from kvroute.events.curve import (
    CurveKeyPair,
    CurveServerConfig,
    secure_client,
    secure_server,
    start_authenticator,
)
from kvroute.events.endpoints import bound_endpoint, is_loopback
from kvroute.events.errors import MalformedKind
from kvroute.replicas.kv_cache.prompt import HashedPrompt
from kvroute.router.tier.peer import (
    MAX_PEER_KEYS,
    DecisionOrigin,
    PeerBeat,
    PeerDecision,
    PeerDecisionCodec,
)

logger = logging.getLogger(__name__)

TOPIC = b"kvroute.decision.v1"
BEAT_TOPIC = b"kvroute.beat.v1"
# A decision's payload: ~9 bytes per key plus the ids; anything beyond is malformed.
MAX_PAYLOAD_BYTES = 9 * MAX_PEER_KEYS + 4096

DecisionCallback = Callable[[PeerDecision], object]


@dataclass(frozen=True)
class DecisionChannelConfig:
    """`endpoint`: where this router's PUB binds (`*`: a free port, read back from
    `DecisionChannel.endpoint`). `hwm`: decisions queued per peer before PUB drops.
    `beat_s`: how often this router tells its peers it is alive, and its next seq."""

    endpoint: str = "tcp://127.0.0.1:*"
    hwm: int = 10_000
    beat_s: float = 1.0
    curve: CurveKeyPair | None = None
    linger_s: float = 0.0  # decisions are hints: closing never waits to flush them


@dataclass
class DecisionChannelStats:
    published: int = 0  # handed to ZeroMQ
    send_dropped: int = 0  # refused by ZeroMQ at once
    received: int = 0  # well-formed decisions from peers
    lost: int = 0  # seqs of a peer that never arrived
    restarts: int = 0  # a peer's seq went backwards: it restarted
    own: int = 0  # this router's own decisions, ignored
    beats: int = 0  # well-formed beats from peers
    callback_errors: int = 0
    malformed: dict[MalformedKind, int] = field(default_factory=dict)


class DecisionChannel:
    """One router's end of the decision channel.

    Create and use it on the router's event loop. `start()` begins receiving;
    `share`/`publish` never block; `close()` stops and releases the sockets.
    """

    def __init__(
        self,
        router_id: str,
        on_decision: DecisionCallback,
        config: DecisionChannelConfig | None = None,
    ) -> None:
        self.config = config = config or DecisionChannelConfig()
        self.router_id = router_id
        self.origin = DecisionOrigin(router_id)
        self.stats = DecisionChannelStats()
        self._on_decision = on_decision
        self._codec = PeerDecisionCodec()
        self._last_seq: dict[str, int] = {}
        self._logged: set[str] = set()
        self._peers: dict[str, str] = {}  # name -> endpoint
        self._heard: set[str] = set()  # senders anything has arrived from
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx = zmq.Context(io_threads=1)
        curve = config.curve
        self._auth = (
            start_authenticator(self._ctx, CurveServerConfig(curve, frozenset({curve.public_key})))
            if curve is not None
            else None
        )
        self._pub: zmq.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        try:
            self._pub = pub = self._ctx.socket(zmq.PUB)
            pub.sndhwm = config.hwm
            pub.linger = int(config.linger_s * 1000)
            if curve is not None:
                secure_server(pub, CurveServerConfig(curve))
            elif not is_loopback(config.endpoint):
                logger.warning(
                    "decision socket %s is reachable off this host without CURVE", config.endpoint
                )
            pub.bind(config.endpoint)
            self.endpoint = bound_endpoint(pub)
            sub = self._ctx.socket(zmq.SUB)
            sub.rcvhwm = config.hwm
            sub.linger = 0
            sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
            sub.setsockopt(zmq.SUBSCRIBE, BEAT_TOPIC)
            self._sub = zmq.asyncio.Socket.from_socket(sub)
        except (zmq.ZMQError, ValueError):
            self._release()
            raise

    # ---------------------------------------------------------------- peers

    def add_peer(self, name: str, endpoint: str, server_key: str | None = None) -> None:
        """Receive the decisions of the router publishing at `endpoint`. With CURVE,
        `server_key` is its public key (default: the routers' shared one)."""
        assert self._sub is not None
        if name in self._peers:
            raise ValueError(f"peer {name!r} already added")
        curve = self.config.curve
        if curve is not None:
            # Per-connection: the key in force at connect time is the one used.
            secure_client(self._sub, curve, server_key or curve.public_key)
        self._sub.connect(endpoint)
        self._peers[name] = endpoint

    def remove_peer(self, name: str) -> None:
        assert self._sub is not None
        self._sub.disconnect(self._peers.pop(name))
        self._heard.discard(name)
        self._last_seq.pop(name, None)

    @property
    def peers(self) -> dict[str, str]:
        return dict(self._peers)

    @property
    def live_peers(self) -> list[str]:
        """Followed peers whose decisions or beats arrive: their subscription is live."""
        return sorted(name for name in self._peers if name in self._heard)

    # ----------------------------------------------------------------- send

    def share(self, replica_id: str, prompt: HashedPrompt) -> bool:
        """Tell the peers this router sent `prompt` to `replica_id`; False if dropped."""
        return self.publish(self.origin.decision(replica_id, prompt))

    def publish(self, decision: PeerDecision) -> bool:
        """Send one decision without waiting; False (counted) if ZeroMQ refuses it."""
        assert self._pub is not None
        try:
            self._pub.send_multipart((TOPIC, self._codec.encode(decision)), zmq.NOBLOCK)
        except zmq.Again:
            self.stats.send_dropped += 1
            self._log_once("send_dropped", "decision channel full: dropping decisions")
            return False
        self.stats.published += 1
        return True

    # -------------------------------------------------------------- receive

    def start(self) -> None:
        """Start receiving and beating on the running event loop."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._receive()), loop.create_task(self._beat())]

    async def _beat(self) -> None:
        assert self._pub is not None
        pub = self._pub
        while True:
            beat = self._codec.encode(self.origin.beat())
            with contextlib.suppress(zmq.Again):  # a full queue: the next beat says it all
                pub.send_multipart((BEAT_TOPIC, beat), zmq.NOBLOCK)
            await asyncio.sleep(self.config.beat_s)

    async def _receive(self) -> None:
        assert self._sub is not None
        sub = self._sub
        while True:
            frames = await sub.recv_multipart()
            self.on_frames(frames)

    def on_frames(self, frames: list[bytes]) -> PeerDecision | None:
        """Check, decode and deliver one message; the decision, or None if dropped
        (or a beat)."""
        if len(frames) != 2 or frames[0] not in (TOPIC, BEAT_TOPIC):
            return self._malformed(MalformedKind.FRAME_COUNT, f"{len(frames)} frames")
        topic, payload = frames
        if len(payload) > MAX_PAYLOAD_BYTES:
            return self._malformed(MalformedKind.OVERSIZED_PAYLOAD, f"{len(payload)} bytes")
        try:
            message: PeerDecision | PeerBeat = (
                self._codec.decode(payload) if topic == TOPIC else self._codec.decode_beat(payload)
            )
        except msgspec.ValidationError as exc:
            return self._malformed(MalformedKind.WRONG_TYPE, str(exc))
        except msgspec.DecodeError as exc:
            return self._malformed(MalformedKind.NOT_MSGPACK, str(exc))
        stats = self.stats
        sender = message.router_id
        if sender == self.router_id:
            if isinstance(message, PeerDecision):
                stats.own += 1
            return None
        self._heard.add(sender)
        if isinstance(message, PeerBeat):
            stats.beats += 1
            self._seen_through(sender, message.next_seq - 1, is_beat=True)
            return None
        decision = message
        self._seen_through(sender, decision.seq, is_beat=False)
        stats.received += 1
        try:
            self._on_decision(decision)
        except Exception:
            stats.callback_errors += 1
            if "callback" not in self._logged:
                self._logged.add("callback")
                logger.exception("applying a peer decision failed")
        return decision

    def _seen_through(self, sender: str, last_sent: int, is_beat: bool) -> None:
        """`sender` has sent every seq up to `last_sent`: count the ones that never
        came. A decision is seq `last_sent` itself; a beat only states it (-1: none
        yet), so a beat repeating the last decision's seq is no restart."""
        stats = self.stats
        last = self._last_seq.get(sender)
        if last is not None:
            expected = last if is_beat else last + 1
            if last_sent > expected:
                stats.lost += last_sent - expected
            elif last_sent < expected:
                stats.restarts += 1
        self._last_seq[sender] = last_sent

    def _malformed(self, kind: MalformedKind, detail: str) -> None:
        malformed = self.stats.malformed
        malformed[kind] = malformed.get(kind, 0) + 1
        self._log_once(kind.value, "dropping malformed peer decisions (%s): %s", kind.value, detail)

    def _log_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args)

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Stop receiving and beating, and release the sockets; idempotent."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._release()

    def _release(self) -> None:
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.term()


__all__ = [
    "BEAT_TOPIC",
    "TOPIC",
    "DecisionChannel",
    "DecisionChannelConfig",
    "DecisionChannelStats",
]
