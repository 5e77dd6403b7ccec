"""A discrete-event simulator: N real engines and the real router, in virtual time.

Everything that decides a result is production code: engines (`build_engine`:
scheduler, KVCacheManager, cost-model executor), the router's core (`Router`:
registration, validation, hashing, reuse hints, KVIndex with predictions,
policies), the event codec, and each source's
`SourceSequencer` (gap detection, replay, resync). Only the clock, the
network and the Ray calls are simulated:
- a step of duration d started at t delivers its tokens at t + d;
- a step's event batch reaches every router `event_delay_s` later, unless the
  drop rate loses it (for that router), in which case the sequencer's replay
  (after `replay_delay_s`) or a snapshot resync repairs that router's index;
- routing sees exact engine loads.

A tier of `routers` routers: the ingress hands each request to one of them
(round robin, or a seeded random pick), each router is a separate `Router` with
its own index, policy and sequencers, and with `share_decisions` every choice
reaches the other routers as a `PeerDecision` `decision_delay_s` later (at once
when 0). One router is the single-router simulator exactly.
Deterministic for a seed: one heap, ties broken by insertion order.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kvroute.events.kv_events import KVEventDecoder, KVEventEncoder
from kvroute.events.sequencer import RecoveryConfig, ResyncReason, SourceSequencer, SourceStats
from kvroute.replicas.api import InvalidRequestError
from kvroute.replicas.clock import VirtualClock
from kvroute.replicas.config import ReplicaSettings
from kvroute.replicas.engine import Engine, RequestOutput
from kvroute.replicas.factory import build_engine
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.request import SamplingParams
from kvroute.router.config import RouterConfig
from kvroute.router.core import Decision, Registration, Router, router_settings
from kvroute.router.index.predictions import DEFAULT_PREDICTION_TTL_S
from kvroute.router.policy import make_policy
from kvroute.router.tier.peer import DecisionOrigin, PeerDecision, PeerDecisionCodec

if TYPE_CHECKING:
    from kvroute.benchmarks.sim.workload import SimRequest, Workload

STEP, DELIVER, REPLAY, RESYNC, TICK, PEER = range(6)
INGRESS = ("round_robin", "random")


@dataclass(frozen=True)
class SimConfig:
    settings: ReplicaSettings
    replicas: int = 8
    policy: str = "kv_aware"
    policy_options: dict[str, Any] = field(default_factory=dict)
    use_predictions: bool = True
    prediction_ttl_s: float = DEFAULT_PREDICTION_TTL_S
    reuse_memory: float = 0.0
    event_delay_s: float = 0.005
    event_drop_rate: float = 0.0
    replay_delay_s: float = 0.01
    max_decode_steps: int = 64
    replay_buffer_steps: int = 10_000
    seed: int = 0
    # The router tier: how many routers, how the ingress spreads requests over
    # them, and whether (and how late) each choice reaches the other routers.
    routers: int = 1
    ingress: str = "round_robin"
    share_decisions: bool = False
    decision_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.routers < 1:
            raise ValueError(f"routers must be >= 1, got {self.routers}")
        if self.ingress not in INGRESS:
            raise ValueError(f"ingress {self.ingress!r}: expected one of {INGRESS}")
        if self.decision_delay_s < 0:
            raise ValueError(f"decision_delay_s must be >= 0, got {self.decision_delay_s}")


@dataclass
class RequestRecord:
    request_id: str
    replica_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    cached_tokens: int
    predicted_tokens: int
    output_tokens: int
    preemptions: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class ReplicaRecord:
    replica_id: str
    requests: int = 0
    prefill_tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0
    preemptions: int = 0
    stream: SourceStats | None = None


@dataclass
class SimResult:
    config: SimConfig
    workload: str
    records: list[RequestRecord]
    replicas: dict[str, ReplicaRecord]
    sim_time_s: float
    wall_time_s: float
    duplication: float
    rejected: list[str] = field(default_factory=list)
    # Per router: requests it routed, and peer decisions it applied.
    routed: list[int] = field(default_factory=list)
    peer_decisions: list[int] = field(default_factory=list)

    @property
    def requests_per_wall_s(self) -> float:
        return len(self.records) / self.wall_time_s if self.wall_time_s else 0.0


class _Publisher:
    """One replica's event publisher: seqs, the replay buffer, and one link per router."""

    def __init__(self, sim: Simulator, replica_id: str) -> None:
        self.sim = sim
        self.replica_id = replica_id
        self.next_seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=sim.config.replay_buffer_steps)
        self.links = [_Link(sim, self, router) for router in sim.routers]

    def publish(self, payload: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self.buffer.append((seq, payload))
        config, rng = self.sim.config, self.sim.rng
        for link in self.links:  # each router's copy is lost, or not, on its own
            if rng.random() >= config.event_drop_rate:
                self.sim.schedule(config.event_delay_s, DELIVER, (link, seq, payload))


class _Link:
    """One router's subscription to one replica's stream: its own sequencer, with
    the simulated network between it and the publisher."""

    def __init__(self, sim: Simulator, publisher: _Publisher, router: Router) -> None:
        self.sim = sim
        self.publisher = publisher
        self.router = router
        self.replica_id = publisher.replica_id
        self.replay_token = 0
        self.stats = SourceStats()
        self.sequencer = SourceSequencer(
            self, RecoveryConfig(), has_replay=True, start_seq=0, stats=self.stats, now=0.0
        )

    # SequencerPort
    def deliver(self, seq: int, payload: bytes, replayed: bool) -> None:
        self.router.apply(self.replica_id, self.sim.decoder.decode(payload))

    def request_replay(self, start_seq: int) -> None:
        self.replay_token += 1
        self.sim.schedule(
            self.sim.config.replay_delay_s, REPLAY, (self, start_seq, self.replay_token)
        )

    def cancel_replay(self) -> None:
        self.replay_token += 1

    def resync(self, reason: ResyncReason) -> None:
        self.sim.schedule(self.sim.config.replay_delay_s, RESYNC, self)

    def replay(self, start_seq: int, token: int, now: float) -> None:
        if token != self.replay_token:
            return
        for seq, payload in list(self.publisher.buffer):
            if seq >= start_seq:
                self.sequencer.on_replay(seq, payload, now)
        self.sequencer.on_replay_end(now)

    def rebuild(self, engine: Engine, now: float) -> None:
        self.router.resync(self.replica_id, engine.snapshot_batch())
        self.sequencer.resynced(self.publisher.next_seq, now)


class Simulator:
    def __init__(self, config: SimConfig, workload: Workload) -> None:
        self.config = config
        self.workload = workload
        self.rng = random.Random(config.seed)
        self.clock = VirtualClock()
        settings = config.settings
        self.engines: dict[str, Engine] = {
            f"r{i}": build_engine(settings, self.clock, seed_offset=i)
            for i in range(config.replicas)
        }
        self.routers = [self._build_router() for _ in range(config.routers)]
        self.publishers = {rid: _Publisher(self, rid) for rid in self.engines}
        self.links = [link for pub in self.publishers.values() for link in pub.links]
        self.origins = [
            DecisionOrigin(f"router-{k}", self.clock.now) for k in range(config.routers)
        ]
        self.peer_codec = PeerDecisionCodec()
        self.ingress_rng = random.Random(f"ingress/{config.seed}")
        self._arrived = 0
        self.routed = [0] * config.routers
        self.peer_applied = [0] * config.routers
        self.encoder = KVEventEncoder()
        self.decoder = KVEventDecoder()
        self.records: list[RequestRecord] = []
        self.rejected: list[str] = []
        self._bar: tqdm | None = None
        self.replica_records = {rid: ReplicaRecord(rid) for rid in self.engines}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._arrivals: list[tuple[float, int, SimRequest]] = []
        self._order = 0
        self._stepping: set[str] = set()
        self._followers: dict[str, list[SimRequest]] = {}
        # request id -> the router that chose, and its decision
        self._pending: dict[str, tuple[int, Decision]] = {}

    def _build_router(self) -> Router:
        """One router of the tier: its own index, policy (seeded alike) and reuse memory."""
        config, settings = self.config, self.config.settings
        router = Router(
            router_settings(
                RouterConfig(),
                settings.hashing,
                settings.model,
                config.replicas,
                prediction_ttl_s=config.prediction_ttl_s,
                use_predictions=config.use_predictions,
                reuse_memory=config.reuse_memory,
            ),
            make_policy(config.policy, **config.policy_options),
            clock=self.clock.now,
        )
        for replica_id, engine in self.engines.items():
            router.register(engine_registration(replica_id, engine, settings))
        return router

    # ---------------------------------------------------------------- queue

    def schedule(self, delay: float, kind: int, data: Any) -> None:
        self._order += 1
        heapq.heappush(self._heap, (self.clock.now() + delay, self._order, kind, data))

    def _add_arrival(self, at: float, request: SimRequest) -> None:
        self._order += 1
        heapq.heappush(self._arrivals, (at, self._order, request))

    # ------------------------------------------------------------------ run

    def run(
        self, progress: bool = True, on_finish: Callable[[RequestRecord], None] | None = None
    ) -> SimResult:
        started = time.perf_counter()
        for request in self.workload.requests:
            if request.after is None:
                if request.arrival_s is None:
                    raise ValueError(
                        f"{request.request_id} has neither an arrival time nor a predecessor"
                    )
                self._add_arrival(request.arrival_s, request)
            else:
                self._followers.setdefault(request.after, []).append(request)
        total = len(self.workload.requests)
        self._bar = bar = tqdm(
            total=total,
            desc=f"{self.workload.name}/{self.config.policy}",
            unit="req",
            disable=not progress,
        )
        self.schedule(0.5, TICK, None)
        while self._arrivals or self._stepping or self._pending:
            next_arrival = self._arrivals[0][0] if self._arrivals else float("inf")
            next_event = self._heap[0][0] if self._heap else float("inf")
            if next_arrival <= next_event:
                at, _, request = heapq.heappop(self._arrivals)
                self.clock.advance_to(max(at, self.clock.now()))
                self._arrive(request)
                continue
            if next_event == float("inf"):
                raise RuntimeError("simulation stalled: requests pending but nothing scheduled")
            at, _, kind, data = heapq.heappop(self._heap)
            self.clock.advance_to(at)
            if kind == STEP:
                finished = self._step(data)
                for record in finished:
                    bar.update()
                    if on_finish is not None:
                        on_finish(record)
            elif kind == TICK:
                for link in self.links:
                    link.sequencer.tick(at)
                if self._arrivals or self._stepping or self._pending:
                    self.schedule(0.5, TICK, None)
            else:
                self._network(kind, data, at)
        bar.close()
        # Let in-flight events land so the final index reflects the caches.
        while self._heap:
            at, _, kind, data = heapq.heappop(self._heap)
            self.clock.advance_to(at)
            if kind != TICK:
                self._network(kind, data, at)
        # The first router's view of each stream (every router's sees the same batches).
        for replica_id, publisher in self.publishers.items():
            self.replica_records[replica_id].stream = publisher.links[0].sequencer.snapshot()
        return SimResult(
            config=self.config,
            workload=self.workload.name,
            records=self.records,
            replicas=self.replica_records,
            sim_time_s=self.clock.now(),
            wall_time_s=time.perf_counter() - started,
            duplication=self._duplication(),
            rejected=self.rejected,
            routed=self.routed,
            peer_decisions=self.peer_applied,
        )

    def _network(self, kind: int, data: Any, at: float) -> None:
        """What the simulated network delivers: event batches, replays, resyncs and
        peer decisions."""
        if kind == DELIVER:
            link, seq, payload = data
            link.sequencer.on_live(seq, payload, at)
        elif kind == REPLAY:
            link, start_seq, token = data
            link.replay(start_seq, token, at)
        elif kind == RESYNC:
            data.rebuild(self.engines[data.replica_id], at)
        elif kind == PEER:
            index, payload = data
            self._apply_peer(index, payload)

    def _report_loads(self, router: Router) -> None:
        """Routing sees exact engine loads: every engine reports before each choice."""
        for replica_id, engine in self.engines.items():
            router.report_load(replica_id, engine.load())

    def _ingress(self) -> int:
        """The router the next request reaches."""
        count = self.config.routers
        if self.config.ingress == "random":
            return self.ingress_rng.randrange(count)
        self._arrived += 1
        return (self._arrived - 1) % count

    def _arrive(self, sim_request: SimRequest) -> None:
        index = self._ingress()
        router = self.routers[index]
        keys = PromptKeys(tuple(sim_request.token_ids()))
        try:
            prepared = router.prepare(keys, sim_request.max_tokens, sim_request.request_id)
        except InvalidRequestError:
            # The router answers 400; like a client, the workload moves on.
            self.rejected.append(sim_request.request_id)
            if self._bar is not None:
                self._bar.update()
            self._release_followers(sim_request.request_id, self.clock.now())
            return
        self._report_loads(router)
        decision = router.choose(prepared)
        self.routed[index] += 1
        replica_id = decision.replica_id
        engine = self.engines[replica_id]
        engine.add_request(
            sim_request.request_id,
            list(prepared.token_ids),
            SamplingParams(max_tokens=sim_request.max_tokens),
            arrival_time=self.clock.now(),
            block_hashes=list(prepared.prompt.block_hashes),
            reuse_hint_tokens=prepared.reuse_hint_tokens,
        )
        self._pending[sim_request.request_id] = (index, decision)
        if self.config.share_decisions and len(self.routers) > 1:
            self._share(index, self.origins[index].decision(replica_id, prepared.prompt))
        if replica_id not in self._stepping:
            self._stepping.add(replica_id)
            self.schedule(0.0, STEP, replica_id)

    def _share(self, sender: int, peer: PeerDecision) -> None:
        """Send a decision to every other router, over the wire format; with no delay
        it lands before anything else happens."""
        payload = self.peer_codec.encode(peer)
        delay = self.config.decision_delay_s
        for index in range(len(self.routers)):
            if index == sender:
                continue
            if delay:
                self.schedule(delay, PEER, (index, payload))
            else:
                self._apply_peer(index, payload)

    def _apply_peer(self, index: int, payload: bytes) -> None:
        self.routers[index].apply_peer(self.peer_codec.decode(payload))
        self.peer_applied[index] += 1

    def _step(self, replica_id: str) -> list[RequestRecord]:
        engine = self.engines[replica_id]
        deadline = self._arrivals[0][0] if self._arrivals else None
        result = engine.step(self.config.max_decode_steps, deadline)
        rec = self.replica_records[replica_id]
        rec.steps += 1
        rec.busy_s += result.duration
        rec.preemptions += result.num_preempted
        if result.events is not None:
            self.publishers[replica_id].publish(self.encoder.encode(result.events))
        finished = [self._finish(replica_id, out) for out in result.outputs if out.finished]
        if engine.has_work:
            self.schedule(max(result.duration, 1e-9), STEP, replica_id)
        else:
            self._stepping.discard(replica_id)
        return finished

    def _finish(self, replica_id: str, out: RequestOutput) -> RequestRecord:
        index, decision = self._pending.pop(out.request_id)
        self.routers[index].finish(decision, out.num_prompt_tokens, out.num_cached_tokens)
        predicted = decision.predicted_hit_tokens
        metrics = out.metrics
        assert metrics.first_token_time is not None and metrics.finish_time is not None
        record = RequestRecord(
            request_id=out.request_id,
            replica_id=replica_id,
            arrival_s=metrics.arrival_time,
            first_token_s=metrics.first_token_time,
            finish_s=metrics.finish_time,
            prompt_tokens=out.num_prompt_tokens,
            cached_tokens=out.num_cached_tokens,
            predicted_tokens=predicted,
            output_tokens=len(out.output_token_ids),
            preemptions=out.num_preemptions,
        )
        self.records.append(record)
        rec = self.replica_records[replica_id]
        rec.requests += 1
        rec.prefill_tokens += out.num_prompt_tokens - out.num_cached_tokens
        self._release_followers(out.request_id, metrics.finish_time)
        return record

    def _release_followers(self, request_id: str, finished_at: float) -> None:
        for follower in self._followers.pop(request_id, ()):
            self._add_arrival(finished_at + follower.think_s, follower)

    def _duplication(self) -> float:
        """Mean number of replicas caching each distinct (hash, group) block."""
        holders: dict[bytes, int] = {}
        for engine in self.engines.values():
            for key in engine.kv_cache.block_pool.cached_block_hash_to_block:
                holders[key] = holders.get(key, 0) + 1
        return sum(holders.values()) / len(holders) if holders else 0.0


def engine_registration(replica_id: str, engine: Any, settings: Any) -> Registration:
    """What an in-process engine built from `settings` registers with a router core."""
    return Registration(
        replica_id=replica_id,
        kv_cache_config=engine.kv_cache.kv_cache_config,
        hash_block_size=settings.model.hash_block_size,
        scheduler_block_size=engine.kv_cache.coordinator.scheduler_block_size,
        use_eagle=settings.model.use_eagle,
        hash_algo=settings.hashing.algo,
        hash_seed=settings.hashing.seed,
        limits=engine.limits,
    )
