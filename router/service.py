"""The router service: event ingest, index, policy and dispatch, as one async actor.

Pipeline (each stage testable alone, this module only wires them):
ZMQ subscriber thread -> `call_soon_threadsafe` -> KVIndex.apply on the event
loop (so the index is single-threaded) -> predict -> policy -> Ray call.

Invariants:
- A replica is indexed only after `register_replica` accepted its hash
  settings; its event source is added in the same call.
- A source that cannot be replayed is rebuilt from the replica's snapshot:
  reset, apply the snapshot, resume the stream at the snapshot's seq.
- A replica whose actor dies is removed from the index and the subscriber,
  and every request in flight to it is retried on another replica.
- On (re)start the router finds the configured replicas by name and rebuilds
  the index from their snapshots, so a router restart loses no state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from events.kv_events import KVEventBatch
from events.sequencer import ResyncReason
from events.source import SourceSpec
from events.subscriber import SubscriberConfig, ZmqEventSubscriber
from replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    LoadReport,
    ReplicaInfo,
    StreamChunk,
    lora_request_for,
    validate_generate,
)
from replicas.request import Request
from router.config import Config
from router.index import KVIndex
from router.metrics import RouterMetrics
from router.policy import ReplicaLoad, make_policy
from router.protocol import CompletionInput
from router.reuse import ReuseTracker
from router.routing import NoReplicaError, RoutingCore
from router.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

ACTOR_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


def replica_actor_name(index: int) -> str:
    return f"replica-{index}"


@dataclass
class ReplicaState:
    info: ReplicaInfo
    handle: Any
    polled: LoadReport = field(default_factory=lambda: LoadReport(0, 0, 0, 0.0, 0))
    pending_prefill: int = 0
    pending_seqs: int = 0
    in_flight: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def load(self) -> ReplicaLoad:
        polled = self.polled
        return ReplicaLoad(
            queued_prefill_tokens=polled.queued_prefill_tokens + self.pending_prefill,
            running_seqs=polled.running_seqs + polled.waiting_seqs + self.pending_seqs,
            kv_usage=polled.kv_usage,
        )


@dataclass
class RoutedResult:
    result: GenerateResult
    text: str
    predicted_hit_tokens: int
    reuse_hint_tokens: int
    routing_s: float
    attempts: int


class RouterService:
    """One router: owns the index, the policy, the subscriber and the HTTP server."""

    def __init__(self, config: Config, serve_http: bool = True) -> None:
        self.config = config
        self.index = KVIndex(
            config.hashing.algo,
            config.hashing.seed,
            prediction_ttl_s=config.router.prediction_ttl_s,
        )
        self.policy = make_policy(config.router.policy, **config.router.policy_options)
        self.reuse = ReuseTracker.for_cluster(
            config.router.reuse_memory,
            config.model.num_blocks * config.replicas.count,
            config.model.hash_block_size,
        )
        self.tokenizer = load_tokenizer(config.model.tokenizer)
        self.limits = None
        self.metrics = RouterMetrics()
        self.replicas: dict[str, ReplicaState] = {}
        self.started_at = time.time()
        self.http_url: str | None = None
        self._loop = asyncio.get_running_loop()
        self.subscriber = ZmqEventSubscriber(
            self._on_batch_thread,
            self._on_resync_thread,
            SubscriberConfig(rcvhwm=config.events.hwm),
        )
        self.subscriber.start()
        self._serve_http = serve_http
        self._tasks: list[asyncio.Task[Any]] = []
        self._boot = self._loop.create_task(self._start())

    # ------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        await self._discover_replicas()
        if self._serve_http:
            from router.http import start_http_server

            self.http_url = await start_http_server(
                self, self.config.router.http_host, self.config.router.http_port
            )
        self._tasks.append(self._loop.create_task(self._poll_loads()))

    async def ready(self) -> str | None:
        """Wait until discovery and the HTTP server are up; returns the HTTP URL."""
        await self._boot
        return self.http_url

    async def _discover_replicas(self) -> None:
        """Rebuild the index from the replicas that already run (router restart)."""
        namespace = self.config.cluster.namespace
        for i in range(self.config.replicas.count):
            try:
                handle = ray.get_actor(replica_actor_name(i), namespace=namespace)
                info = await handle.info.remote()
            except (ValueError, *ACTOR_GONE):
                continue  # not started yet: it will register itself
            except Exception:
                continue
            if info.replica_id in self.replicas:
                continue
            self._admit(info, handle, start_seq=None)
            await self._resync(info.replica_id)
            logger.info("rebuilt replica %s from its snapshot", info.replica_id)

    async def register_replica(self, info: ReplicaInfo) -> None:
        """Called by a replica before it publishes; refused on hash mismatch."""
        handle = ray.get_actor(info.actor_name, namespace=info.namespace)
        if info.replica_id in self.replicas:
            # Known from discovery (it registered while we restarted): keep it.
            return
        self._admit(info, handle, start_seq=0)

    def _admit(self, info: ReplicaInfo, handle: Any, start_seq: int | None) -> None:
        self.index.register(
            info.replica_id,
            info.kv_cache_config,
            hash_block_size=info.hash_block_size,
            scheduler_block_size=info.scheduler_block_size,
            use_eagle=info.use_eagle,
            hash_algo=info.hash_algo,
            hash_seed=info.hash_seed,
            prefix_cache_retention_interval=info.retention_interval,
        )
        self.replicas[info.replica_id] = ReplicaState(info, handle)
        self.subscriber.add_source(
            SourceSpec(
                name=info.replica_id,
                endpoint=info.event_endpoint,
                replay_endpoint=info.replay_endpoint,
                start_seq=start_seq,
            )
        )

    def _replica_died(self, replica_id: str) -> None:
        state = self.replicas.pop(replica_id, None)
        if state is None:
            return
        logger.warning("replica %s died; removing it from the index", replica_id)
        self.index.remove(replica_id)
        self.subscriber.remove_source(replica_id)
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(replica_id)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.subscriber.stop()

    # --------------------------------------------------------------- ingest

    def _on_batch_thread(self, source: str, seq: int, batch: KVEventBatch) -> None:
        self._loop.call_soon_threadsafe(self._apply, source, batch)

    def _apply(self, source: str, batch: KVEventBatch) -> None:
        if source in self.replicas:
            self.index.apply(source, batch)

    def _on_resync_thread(self, source: str, reason: ResyncReason) -> None:
        logger.warning("event stream of %s needs a resync (%s)", source, reason.value)
        self._loop.call_soon_threadsafe(
            lambda: self._tasks.append(self._loop.create_task(self._resync(source)))
        )

    async def _resync(self, replica_id: str) -> None:
        state = self.replicas.get(replica_id)
        if state is None:
            return
        try:
            snapshot = await state.handle.snapshot.remote()
        except ACTOR_GONE:
            self._replica_died(replica_id)
            return
        self.index.reset(replica_id)
        self.index.apply(replica_id, snapshot.batch)
        self.subscriber.resynced(replica_id, snapshot.next_seq)

    async def _poll_loads(self) -> None:
        """Refresh every replica's load each `load_poll_s`, all at once, so one slow
        replica delays no other's report."""
        interval = self.config.router.load_poll_s
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._poll(rid, s) for rid, s in list(self.replicas.items())))

    async def _poll(self, replica_id: str, state: ReplicaState) -> None:
        try:
            state.polled = await asyncio.wait_for(state.handle.load.remote(), timeout=5.0)
            state.pending_prefill = state.pending_seqs = 0
        except ACTOR_GONE:
            self._replica_died(replica_id)
        except (TimeoutError, GetTimeoutError):
            logger.warning("replica %s did not report its load in 5 s", replica_id)

    # -------------------------------------------------------------- routing

    def prepare(self, body: CompletionInput) -> Request:
        """Tokenize and validate; raises InvalidRequestError naming the problem."""
        model = self.config.model
        tokens = (
            body.token_ids if body.token_ids is not None else self.tokenizer.encode(body.text or "")
        )
        limits_source = next(iter(self.replicas.values()), None)
        limits = limits_source.info.limits if limits_source else None
        if limits is not None:
            validate_generate(tokens, body.max_tokens, body.lora_name, limits)
        return Request(
            body.request_id or f"cmpl-{uuid.uuid4().hex[:16]}",
            tokens,
            None,
            lora_request=lora_request_for(body.lora_name, model.lora_names),
            cache_salt=body.cache_salt,
            block_hasher=self.index.hasher(model.hash_block_size),
        )

    async def generate(self, body: CompletionInput) -> RoutedResult:
        """Route and dispatch; if the chosen replica dies, retry elsewhere."""
        routed = None
        async for item in self._attempts(body, stream=False):
            routed = item  # exactly one item; run the generator to its end
        assert isinstance(routed, RoutedResult)
        return routed

    async def generate_stream(
        self, body: CompletionInput
    ) -> AsyncIterator[StreamChunk | RoutedResult]:
        """Route and stream: a StreamChunk per engine step, then the RoutedResult.
        A replica that dies before the first chunk is retried elsewhere; one that
        dies mid-stream ends the stream with NoReplicaError."""
        async for item in self._attempts(body, stream=True):
            yield item

    async def _attempts(
        self, body: CompletionInput, stream: bool
    ) -> AsyncIterator[StreamChunk | RoutedResult]:
        request = self.prepare(body)
        if not self.replicas:
            raise NoReplicaError("no replica is available")
        wire = GenerateRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            max_tokens=body.max_tokens,
            lora_name=body.lora_name,
            cache_salt=body.cache_salt,
            reuse_hint_tokens=(
                self.reuse.observe(request.block_hashes) if self.reuse is not None else 0
            ),
        )
        tried: set[str] = set()
        for attempt in range(1, self.config.router.max_retries + 2):
            started = time.perf_counter()
            replica_id, hit = self._choose(request, tried)
            routing_s = time.perf_counter() - started
            self.metrics.routing_seconds.observe(routing_s)
            state = self.replicas[replica_id]
            state.pending_prefill += request.num_tokens - hit
            state.pending_seqs += 1
            state.in_flight += 1
            streamed = False
            try:
                if stream:
                    calls = state.handle.generate_stream.options(num_returns="streaming")
                    async for ref in calls.remote(wire):
                        item = await ref
                        if isinstance(item, StreamChunk):
                            streamed = True
                            yield item
                        else:
                            yield self._record(state, item, wire, hit, routing_s, attempt)
                else:
                    result = await state.handle.generate.remote(wire)
                    yield self._record(state, result, wire, hit, routing_s, attempt)
                return
            except ACTOR_GONE:
                self._replica_died(replica_id)
                if streamed:
                    self.metrics.requests.labels("failed").inc()
                    raise NoReplicaError(f"replica {replica_id} died mid-stream") from None
                tried.add(replica_id)
                self.metrics.retries.inc()
            except InvalidRequestError:
                self.index.drop_predictions(replica_id, request)
                raise
            finally:
                # Until the next poll, the router's own count stands in for the
                # replica's queue: a request that ended leaves it either way.
                state.in_flight -= 1
                state.pending_prefill = max(0, state.pending_prefill - (request.num_tokens - hit))
                state.pending_seqs = max(0, state.pending_seqs - 1)
        self.metrics.requests.labels("failed").inc()
        raise NoReplicaError(f"every replica tried ({sorted(tried)}) died during the request")

    def _record(
        self,
        state: ReplicaState,
        result: GenerateResult,
        wire: GenerateRequest,
        hit: int,
        routing_s: float,
        attempt: int,
    ) -> RoutedResult:
        state.requests += 1
        state.prompt_tokens += result.num_prompt_tokens
        state.cached_tokens += result.num_cached_tokens
        self.metrics.requests.labels("ok").inc()
        self.metrics.prompt_tokens.inc(result.num_prompt_tokens)
        self.metrics.cached_tokens.inc(result.num_cached_tokens)
        self.metrics.predicted_tokens.inc(hit)
        self.metrics.ttft_seconds.observe(result.ttft_s)
        return RoutedResult(
            result=result,
            text=self.tokenizer.decode(result.output_token_ids),
            predicted_hit_tokens=hit,
            reuse_hint_tokens=wire.reuse_hint_tokens,
            routing_s=routing_s,
            attempts=attempt,
        )

    def _choose(self, request: Request, tried: set[str]) -> tuple[str, int]:
        loads = {rid: s.load() for rid, s in self.replicas.items() if rid not in tried}
        return RoutingCore(self.index, self.policy).choose(request, loads)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        replicas = []
        for replica_id, state in sorted(self.replicas.items()):
            stream = self.subscriber.stats(replica_id)
            replicas.append(
                {
                    "replica_id": replica_id,
                    "node_id": state.info.node_id,
                    "state": stream.state.value,
                    "indexed_blocks": self.index.replica_block_count(replica_id),
                    "cached_blocks": state.polled.num_cached_blocks,
                    "queued_prefill_tokens": state.polled.queued_prefill_tokens,
                    "running_seqs": state.polled.running_seqs,
                    "kv_usage": round(state.polled.kv_usage, 4),
                    "in_flight": state.in_flight,
                    "requests": state.requests,
                    "hit_rate": round(state.cached_tokens / state.prompt_tokens, 4)
                    if state.prompt_tokens
                    else 0.0,
                    "batches": stream.batches,
                    "gaps": stream.gaps,
                    "resyncs": stream.resyncs,
                    "malformed": stream.malformed,
                }
            )
        stats = self.index.stats
        return {
            "policy": self.policy.name,
            "index_entries": len(self.index),
            "predicted_entries": self.index.num_predicted(),
            "index_dropped": {
                "unknown_replica": stats.unknown_replica,
                "unknown_group": stats.unknown_group,
                "mismatched_group": stats.mismatched_group,
                "bad_hash": stats.bad_hash,
            },
            "replicas": replicas,
        }

    def render_metrics(self) -> bytes:
        m = self.metrics
        m.index_entries.set(len(self.index))
        stats = self.index.stats
        for reason in ("unknown_replica", "unknown_group", "mismatched_group", "bad_hash"):
            m.index_drops.labels(reason).set(getattr(stats, reason))
        for replica_id in self.replicas:
            stream = self.subscriber.stats(replica_id)
            for state in ("exact", "recovering", "degraded"):
                m.replica_state.labels(replica_id, state).set(
                    1 if stream.state.value == state else 0
                )
            m.replica_blocks.labels(replica_id).set(self.index.replica_block_count(replica_id))
            for counter in ("batches", "events", "gaps", "replays", "resyncs", "malformed"):
                m.event_counters.labels(replica_id, counter).set(getattr(stream, counter))
        return m.render()

    def predict_hits(self, body: CompletionInput) -> dict[str, int]:
        """Per replica, the prompt tokens it would serve from cache, as known from
        applied events only (no predictions): what `kvroute status` can't show."""
        return self.index.predict(self.prepare(body))

    def set_policy(self, name: str, **options: Any) -> None:
        """Switch the routing policy (e.g. to replay a workload under a baseline)."""
        self.policy = make_policy(name, **options)

    # ------------------------------------------------------------- for tests

    def instance_id(self) -> int:
        """This router process's pid: changes when Ray restarts the actor."""
        return os.getpid()

    def replica_ids(self) -> list[str]:
        return sorted(self.replicas)

    async def wait_for_replicas(self, count: int, timeout_s: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while len(self.replicas) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.replicas)} of {count} replicas registered")
            await asyncio.sleep(0.05)
        return self.replica_ids()
