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
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import ray
from ray.exceptions import GetTimeoutError

from events.curve import CurveKeyPair
from events.kv_events import KVEventBatch
from events.sequencer import ResyncReason
from events.source import SourceSpec
from events.subscriber import SubscriberConfig, ZmqEventSubscriber
from replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ModelLimits,
    ReplicaInfo,
    ReplicaLoad,
    StreamChunk,
)
from replicas.kv_cache.coordinator import default_scheduler_block_size
from replicas.kv_cache.prompt import PromptKeys
from router.backends import ACTOR_GONE, Backend, RayReplica, ReplicaUnavailableError
from router.chat import ChatTemplate
from router.config import Config, ExternalEngineConfig
from router.core import (
    Decision,
    NoReplicaError,
    PreparedPrompt,
    Registration,
    RequestTimeoutError,
    Router,
    RouterSettings,
)
from router.decisions import DecisionChannel, DecisionChannelConfig
from router.engine_client import HttpEngine
from router.metrics import ReplicaView, RouterMetrics, ScrapeView
from router.policy import make_policy
from router.protocol import CompletionInput, ModelNotFoundError, RoutedResult
from router.tokenizer import load_tokenizer, tokenizer_file

logger = logging.getLogger(__name__)


ROUTER_NAME = "router"


def replica_actor_name(index: int) -> str:
    return f"replica-{index}"


def router_actor_name(index: int) -> str:
    """Router 0 is the one replicas register with; the others are its peers."""
    return ROUTER_NAME if index == 0 else f"{ROUTER_NAME}-{index}"


async def _within(awaitable: Any, deadline: float) -> Any:
    """`awaitable`'s result, or TimeoutError once `deadline` (perf_counter) passes.
    asyncio.timeout cancels this task at the deadline; unlike wait_for it starts no
    task of its own, which costs about 5% of the router's requests/s at this rate."""
    async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
        return await awaitable


class _TokenClock:
    """End-to-end TTFT and inter-token latency of one request, as the router sees them."""

    def __init__(self, metrics: RouterMetrics, arrived: float) -> None:
        self.metrics = metrics
        self.arrived = arrived
        self.last: float | None = None

    def tokens(self, count: int) -> None:
        """`count` tokens arrived now (one streamed step)."""
        now = time.perf_counter()
        if self.last is None:
            self.metrics.e2e_ttft_seconds.observe(now - self.arrived)
            count -= 1
        elif count:
            gap = (now - self.last) / count
            for _ in range(count):
                self.metrics.inter_token_seconds.observe(gap)
        self.last = now

    def whole(self, result: GenerateResult) -> None:
        """A non-streamed result: its first token came `latency - ttft` before the end."""
        decode_s = max(0.0, result.latency_s - result.ttft_s)
        self.metrics.e2e_ttft_seconds.observe(time.perf_counter() - self.arrived - decode_s)
        later = len(result.output_token_ids) - 1
        for _ in range(later):
            self.metrics.inter_token_seconds.observe(decode_s / later)


@dataclass
class ReplicaLink:
    """How the service reaches one replica: its registration and its backend.
    `node_id` is the Ray node of an actor replica (None for an external engine)."""

    registration: Registration
    backend: Backend
    node_id: str | None = None

    @property
    def external(self) -> bool:
        return self.node_id is None


def external_registration(engine: ExternalEngineConfig, config: Config) -> Registration:
    """An external engine's registration, from its configured layout."""
    layout = engine.layout or config.model
    seeded = engine.hash_mode == "seeded"
    kv_cache_config = layout.kv_cache_config()
    return Registration(
        replica_id=engine.name,
        kv_cache_config=kv_cache_config,
        hash_block_size=layout.hash_block_size,
        scheduler_block_size=default_scheduler_block_size(kv_cache_config),
        use_eagle=layout.use_eagle,
        hash_algo=config.hashing.algo,
        hash_seed=(engine.hash_seed or "") if seeded else config.hashing.seed,
        limits=ModelLimits(layout.max_model_len, layout.vocab_size, tuple(layout.lora_names)),
        hash_mode=engine.hash_mode,
    )


def registration_of(info: ReplicaInfo) -> Registration:
    return Registration(
        replica_id=info.replica_id,
        kv_cache_config=info.kv_cache_config,
        hash_block_size=info.hash_block_size,
        scheduler_block_size=info.scheduler_block_size,
        use_eagle=info.use_eagle,
        hash_algo=info.hash_algo,
        hash_seed=info.hash_seed,
        limits=info.limits,
        retention_interval=info.retention_interval,
    )


def router_settings(config: Config) -> RouterSettings:
    return RouterSettings(
        hash_algo=config.hashing.algo,
        hash_seed=config.hashing.seed,
        hash_block_size=config.model.hash_block_size,
        prediction_ttl_s=config.router.prediction_ttl_s,
        reuse_memory=config.router.reuse_memory,
        cluster_blocks=config.model.num_blocks * config.engine_count,
        max_retries=config.router.max_retries,
        max_requests_per_replica=config.router.max_requests_per_replica,
        max_queued_prefill_tokens=config.router.max_queued_prefill_tokens,
    )


class RouterService:
    """One router: owns the index, the policy, the subscriber and the HTTP server."""

    def __init__(
        self,
        config: Config,
        serve_http: bool = True,
        curve: CurveKeyPair | None = None,
        api_keys: frozenset[str] = frozenset(),
        name: str = ROUTER_NAME,
    ) -> None:
        """`curve`: the routers' key pair, which every replica's event sockets accept.
        `api_keys`: the keys /v1/* accepts, read by the launcher where the config is."""
        self.api_keys = api_keys
        if config.events.security == "curve" and curve is None:
            raise ValueError("events.security is curve, but the router was given no key pair")
        self.config = config
        self.model_name = config.model.name
        policy = make_policy(config.router.policy, **config.router.policy_options)
        self.core = Router(router_settings(config), policy)
        tokenizer = tokenizer_file(config.model.tokenizer, config.model.path)
        self.tokenizer = load_tokenizer(tokenizer)
        self.chat_template = ChatTemplate.for_model(Path(tokenizer).parent if tokenizer else None)
        # OpenAI's system_fingerprint: changes whenever the served model's config does.
        model_digest = hashlib.sha256(msgspec.json.encode(config.model)).hexdigest()
        self.fingerprint = f"fp_{model_digest[:12]}"
        self.metrics = RouterMetrics(self._scrape_view)
        self.replicas: dict[str, ReplicaLink] = {}
        self.started_at = time.time()
        self.http_url: str | None = None
        self._loop = asyncio.get_running_loop()
        self.subscriber = ZmqEventSubscriber(
            self._on_batch_thread,
            self._on_resync_thread,
            SubscriberConfig(rcvhwm=config.events.hwm, curve=curve),
        )
        self.subscriber.start()
        self.name = name
        self.decisions: DecisionChannel | None = None
        if config.router.share_decisions and config.router.count > 1:
            self.decisions = DecisionChannel(
                name,
                self.core.apply_peer,
                DecisionChannelConfig(
                    endpoint=f"tcp://{config.events.host}:*", hwm=config.events.hwm, curve=curve
                ),
            )
            self.decisions.start()
        self._serve_http = serve_http
        # External engines refused for events that contradict their layout, and why.
        self.refused: dict[str, str] = {}
        # One bounded connection pool for every external engine, made on first use.
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._boot = self._loop.create_task(self._start())

    # ------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        await self._discover_replicas()
        if self._serve_http:
            from router.http import HttpOptions, start_http_server

            router = self.config.router
            options = HttpOptions(
                fingerprint=self.fingerprint,
                max_body_bytes=router.max_body_bytes,
                body_timeout_s=router.body_timeout_s,
                api_keys=self.api_keys,
                expose_routing=router.expose_routing,
                min_ready_replicas=router.min_ready_replicas,
                header_timeout_s=router.header_timeout_s,
                max_connections=router.max_connections,
                keepalive_timeout_s=router.keepalive_timeout_s,
            )
            self.http_url = await start_http_server(
                self, router.http_host, router.http_port, options
            )
        self._tasks.append(self._loop.create_task(self._poll_loads()))
        self._tasks.append(self._loop.create_task(self._supervise()))

    async def ready(self) -> str | None:
        """Wait until discovery and the HTTP server are up; returns the HTTP URL."""
        await self._boot
        return self.http_url

    async def _discover_replicas(self) -> None:
        """Index every configured replica that runs and is not indexed here yet.

        `start()` is idempotent and returns the replica's registration: one that Ray
        restarted after a crash starts now and registers with the first router; a
        router restarted, or any router but the first, adopts the replica from the
        returned registration and rebuilds its entries from a snapshot.
        """
        await self._discover_external()
        namespace = self.config.cluster.namespace
        for i in range(self.config.replicas.count):
            name = replica_actor_name(i)
            if name in self.replicas:
                continue
            try:
                handle = ray.get_actor(name, namespace=namespace)
                info = await asyncio.wait_for(handle.start.remote(), timeout=30.0)
            except (ValueError, TimeoutError, *ACTOR_GONE):
                continue  # not created yet, restarting, or gone for good
            except Exception:
                logger.warning("could not start replica %s", name, exc_info=True)
                continue
            if info.replica_id in self.replicas:
                continue  # it registered with this router while starting
            self._admit_actor(info, handle, start_seq=None)
            await self._resync(info.replica_id)
            logger.info("indexed replica %s from its snapshot", info.replica_id)

    def _engine_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            router = self.config.router
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=router.max_engine_connections),
                timeout=aiohttp.ClientTimeout(total=None, connect=router.engine_connect_timeout_s),
            )
        return self._session

    async def _discover_external(self) -> None:
        """Admit every configured external engine that answers `/health` and is not
        routed to yet: at boot, and again after it failed and came back. Its entries
        start empty and follow its event stream from the next batch."""
        for engine in self.config.external:
            if engine.name in self.replicas or engine.name in self.refused:
                continue
            backend = HttpEngine(engine.name, engine.url, self.model_name, self._engine_session())
            try:
                healthy = await asyncio.wait_for(
                    backend.healthy(), self.config.router.load_timeout_s
                )
            except TimeoutError:
                healthy = False
            if not healthy:
                continue
            try:
                registration = external_registration(engine, self.config)
                self._admit(registration, backend, self._external_source(engine), None)
            except ValueError as exc:
                logger.error("engine %s refused: %s", engine.name, exc)
                continue
            logger.info("routing to external engine %s at %s", engine.name, engine.url)

    @staticmethod
    def _external_source(engine: ExternalEngineConfig) -> SourceSpec:
        events = engine.events
        return SourceSpec(
            name=engine.name,
            endpoint=events.endpoint,
            replay_endpoint=events.replay_endpoint,
            topic=events.topic,
            start_seq=None,
            curve_server_key=events.curve_public_key(),
        )

    async def register_replica(self, info: ReplicaInfo) -> None:
        """Called by a replica before it publishes; refused on hash mismatch."""
        handle = ray.get_actor(info.actor_name, namespace=info.namespace)
        if info.replica_id in self.replicas:
            # Known from discovery (it registered while we restarted): keep it.
            return
        self._admit_actor(info, handle, start_seq=0)

    def _admit_actor(self, info: ReplicaInfo, handle: Any, start_seq: int | None) -> None:
        source = SourceSpec(
            name=info.replica_id,
            endpoint=info.event_endpoint,
            replay_endpoint=info.replay_endpoint,
            start_seq=start_seq,
            curve_server_key=info.curve_public_key,
        )
        self._admit(registration_of(info), RayReplica(handle), source, info.node_id)

    def _admit(
        self, registration: Registration, backend: Backend, source: SourceSpec, node: str | None
    ) -> None:
        """Index and route to a replica; refused (ValueError) on a hash mismatch."""
        self.core.register(registration)
        self.replicas[registration.replica_id] = ReplicaLink(registration, backend, node)
        self.subscriber.add_source(source)

    def _replica_died(self, replica_id: str) -> None:
        link = self.replicas.pop(replica_id, None)
        if link is None:
            return
        logger.warning("replica %s is gone; removing it from the index", replica_id)
        self.core.remove(replica_id)
        self.subscriber.remove_source(replica_id)
        self._loop.create_task(link.backend.close())

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.subscriber.stop()
        if self.decisions is not None:
            await self.decisions.close()
        if self._session is not None:
            await self._session.close()

    # --------------------------------------------------------------- ingest

    def _on_batch_thread(self, source: str, seq: int, batch: KVEventBatch) -> None:
        self._loop.call_soon_threadsafe(self._apply, source, batch)

    def _apply(self, source: str, batch: KVEventBatch) -> None:
        link = self.replicas.get(source)
        if link is None:
            return
        stats = self.core.index.stats
        misfits = stats.unknown_group + stats.mismatched_group
        self.core.apply(source, batch)
        if link.external and stats.unknown_group + stats.mismatched_group > misfits:
            self._refuse(source, link.registration)

    def _refuse(self, replica_id: str, registration: Registration) -> None:
        """An external engine whose events contradict its configured layout would be
        mispredicted: it leaves routing and is not admitted again until the router
        restarts (with its layout fixed)."""
        groups = registration.kv_cache_config.kv_cache_groups
        layout = ", ".join(
            f"group {i}: {g.kv_cache_spec.kind.value} of block size {g.kv_cache_spec.block_size}"
            for i, g in enumerate(groups)
        )
        reason = (
            f"its KV events do not match its configured layout ({layout}): an unknown group, "
            "or another kind or block size"
        )
        logger.error("engine %s refused: %s", replica_id, reason)
        self.refused[replica_id] = reason
        self._replica_died(replica_id)

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
            snapshot = await state.backend.snapshot()
        except ReplicaUnavailableError:
            self._replica_died(replica_id)
            return
        if snapshot is None:
            # No snapshot to be had: start over empty, from the next batch.
            self.core.resync(replica_id, KVEventBatch(ts=time.time(), events=[]))
            self.subscriber.resynced(replica_id, None)
            return
        self.core.resync(replica_id, snapshot.batch)
        self.subscriber.resynced(replica_id, snapshot.next_seq)

    async def _poll_loads(self) -> None:
        """Refresh every replica's load each `load_poll_s`, all at once, so one slow
        replica delays no other's report."""
        interval = self.config.router.load_poll_s
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._poll(rid, s) for rid, s in list(self.replicas.items())))

    async def _poll(self, replica_id: str, link: ReplicaLink) -> None:
        timeout = self.config.router.load_timeout_s
        try:
            load = await asyncio.wait_for(link.backend.load(), timeout=timeout)
        except ReplicaUnavailableError:
            self._replica_died(replica_id)
            return
        except (TimeoutError, GetTimeoutError):
            if replica_id in self.core.replicas and not self.core.replicas[replica_id].suspect:
                logger.warning(
                    "replica %s did not report its load in %g s: routing around it",
                    replica_id,
                    timeout,
                )
            self.core.mark_suspect(replica_id, True)
            return
        self.core.report_load(replica_id, load)
        self.core.mark_suspect(replica_id, False)

    async def _supervise(self) -> None:
        """Every `supervise_s`, find configured replicas that are not indexed here:
        restarted after a crash, started after this router, or missed at boot; and
        follow the decisions of every peer router, new or restarted."""
        while True:
            await asyncio.sleep(self.config.router.supervise_s)
            await self._check_external_health()
            await self._discover_replicas()
            if self.decisions is not None:
                await self._follow_peers(self.decisions)

    async def _check_external_health(self) -> None:
        """An external engine whose `/health` answers other than 200 (vLLM answers 503
        once its engine core died), or refuses the connection, leaves routing and the
        index; discovery admits it again, empty, when it is healthy."""
        engines = [
            (rid, link.backend)
            for rid, link in self.replicas.items()
            if isinstance(link.backend, HttpEngine)
        ]
        timeout = self.config.router.load_timeout_s
        for rid, engine in engines:
            try:
                healthy = await asyncio.wait_for(engine.healthy(), timeout)
            except TimeoutError:
                continue  # slow, not failed: the load poll routes around it
            if not healthy:
                logger.warning("engine %s failed its health check", rid)
                self._replica_died(rid)

    def decision_endpoint(self) -> str | None:
        """Where this router publishes its decisions (None: not sharing)."""
        return self.decisions.endpoint if self.decisions is not None else None

    async def _follow_peers(self, channel: DecisionChannel) -> None:
        """Subscribe to each peer router's decisions; a restarted peer binds a new
        port, so a changed endpoint is followed anew."""
        namespace = self.config.cluster.namespace
        for i in range(self.config.router.count):
            peer = router_actor_name(i)
            if peer == self.name:
                continue
            try:
                handle = ray.get_actor(peer, namespace=namespace)
                endpoint = await asyncio.wait_for(handle.decision_endpoint.remote(), 5.0)
            except (ValueError, TimeoutError, *ACTOR_GONE):
                continue  # not started yet, or restarting
            known = channel.peers.get(peer)
            if endpoint is None or endpoint == known:
                continue
            if known is not None:
                channel.remove_peer(peer)
            channel.add_peer(peer, endpoint)
            logger.info("following the decisions of router %s at %s", peer, endpoint)

    # -------------------------------------------------------------- routing

    def prompt_keys(self, body: CompletionInput) -> PromptKeys:
        """The body's prompt, tokenized, with the keys its block hashes depend on."""
        tokens = (
            body.token_ids if body.token_ids is not None else self.tokenizer.encode(body.text or "")
        )
        return PromptKeys(tuple(tokens), lora_name=body.lora_name, cache_salt=body.cache_salt)

    def prepare(self, body: CompletionInput) -> PreparedPrompt:
        """Tokenize, validate and hash; raises InvalidRequestError naming the problem.
        Every dispatch gets its own internal id: a client's id never reaches a replica."""
        keys = self.prompt_keys(body)
        max_tokens = body.max_tokens
        if max_tokens is None:
            limits = self.core.limits
            context = limits.max_model_len if limits is not None else keys.num_tokens + 1
            max_tokens = max(1, context - keys.num_tokens)
        return self.core.prepare(keys, max_tokens, f"kv-{uuid.uuid4().hex}")

    def resolve_model(self, model: str | None) -> str | None:
        """The LoRA adapter `model` names (None for the base model); ModelNotFoundError
        for a name this cluster does not serve."""
        if model is None or model == self.model_name:
            return None
        if model in self.config.model.lora_names:
            return model
        raise ModelNotFoundError(model)

    def models(self) -> list[dict[str, Any]]:
        """The served model and its LoRA adapters, as /v1/models lists them."""
        created = int(self.started_at)
        base = {
            "id": self.model_name,
            "object": "model",
            "created": created,
            "owned_by": "kvroute",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.config.model.max_model_len,
        }
        adapters = [
            {**base, "id": name, "root": name, "parent": self.model_name}
            for name in self.config.model.lora_names
        ]
        return [base, *adapters]

    def render_chat(self, messages: tuple[dict[str, Any], ...]) -> list[int]:
        """A conversation as the prompt token ids the model expects."""
        text = self.chat_template.render(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

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
        prepared = self.prepare(body)
        wire = GenerateRequest(
            request_id=prepared.request_id,
            prompt_token_ids=list(prepared.token_ids),
            max_tokens=prepared.max_tokens,
            lora_name=body.lora_name,
            cache_salt=body.cache_salt,
            reuse_hint_tokens=prepared.reuse_hint_tokens,
            sampling=body.sampling,
            prompt_block_hashes=list(prepared.prompt.block_hashes),
            hash_block_size=self.core.hasher.block_size,
        )
        arrived = time.perf_counter()
        clock = _TokenClock(self.metrics, arrived)
        allowed = self.config.router.request_timeout_s
        if body.timeout_s is not None:
            allowed = min(allowed, body.timeout_s)
        deadline = arrived + allowed
        tried: set[str] = set()
        while True:
            decision = self.core.choose(prepared, tried)
            self.metrics.routing_seconds.observe(decision.routing_s)
            if self.decisions is not None:
                self.decisions.share(decision.replica_id, prepared.prompt)
            backend = self.replicas[decision.replica_id].backend
            streamed = ended = refused = False
            try:
                if stream:
                    items = backend.generate_stream(wire)
                    while True:
                        try:
                            item = await _within(items.__anext__(), deadline)
                        except StopAsyncIteration:
                            break
                        if isinstance(item, StreamChunk):
                            streamed = True
                            clock.tokens(len(item.new_token_ids))
                            yield item
                        else:
                            ended = True
                            yield self._finished(decision, item, prepared)
                else:
                    result = await _within(backend.generate(wire), deadline)
                    ended = True
                    clock.whole(result)
                    yield self._finished(decision, result, prepared)
                return
            except ReplicaUnavailableError:
                ended = True
                self.core.release(decision, prepared, refused=False)
                self._replica_died(decision.replica_id)
                tried.add(decision.replica_id)
                if streamed or not self.core.may_retry(len(tried)):
                    self.metrics.requests.labels("failed").inc()
                    if streamed:
                        raise NoReplicaError(
                            f"replica {decision.replica_id} died mid-stream"
                        ) from None
                    raise NoReplicaError(
                        f"every replica tried ({sorted(tried)}) died during the request"
                    ) from None
                self.metrics.retries.inc()
            except InvalidRequestError:
                refused = True
                raise
            except TimeoutError:
                self.metrics.requests.labels("timeout").inc()
                raise RequestTimeoutError(
                    f"the request did not finish within {allowed:g} s and was aborted"
                ) from None
            finally:
                # Refused, cancelled (the client left), timed out, or cut short by a
                # stop string: the attempt leaves the pending count exactly once,
                # and a replica still working on it is told to stop and free its
                # blocks.
                if not ended:
                    self.core.release(decision, prepared, refused=refused)
                    if not refused:
                        backend.abort(wire.request_id)

    def _finished(
        self, decision: Decision, result: GenerateResult, prepared: PreparedPrompt
    ) -> RoutedResult:
        self.core.finish(decision, result.num_prompt_tokens, result.num_cached_tokens)
        self.metrics.requests.labels("ok").inc()
        self.metrics.prompt_tokens.inc(result.num_prompt_tokens)
        self.metrics.cached_tokens.inc(result.num_cached_tokens)
        self.metrics.predicted_tokens.inc(decision.predicted_hit_tokens)
        self.metrics.ttft_seconds.observe(result.ttft_s)
        return RoutedResult(
            result=result,
            text=self.tokenizer.decode(result.output_token_ids),
            predicted_hit_tokens=decision.predicted_hit_tokens,
            reuse_hint_tokens=prepared.reuse_hint_tokens,
            routing_s=decision.routing_s,
            attempts=decision.attempt,
        )

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def live_replicas(self) -> int:
        return len(self.replicas)

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        index = self.core.index
        replicas = []
        for replica_id, link in sorted(self.replicas.items()):
            stream = self.subscriber.stats(replica_id)
            served = self.core.replicas[replica_id]
            reported = served.reported
            replicas.append(
                {
                    "replica_id": replica_id,
                    "kind": "external" if link.external else "actor",
                    "node_id": link.node_id,
                    "state": stream.state.value,
                    "indexed_blocks": index.replica_block_count(replica_id),
                    "cached_blocks": reported.num_cached_blocks,
                    "queued_prefill_tokens": reported.queued_prefill_tokens,
                    "running_seqs": reported.running_seqs,
                    "kv_usage": round(reported.kv_usage, 4),
                    "in_flight": served.in_flight,
                    "suspect": served.suspect,
                    "requests": served.requests,
                    "hit_rate": round(served.hit_rate, 4),
                    "batches": stream.batches,
                    "gaps": stream.gaps,
                    "resyncs": stream.resyncs,
                    "malformed": stream.malformed,
                }
            )
        stats = index.stats
        shared = self.decisions.stats if self.decisions is not None else None
        return {
            "router": self.name,
            "policy": self.core.policy.name,
            "refused": dict(self.refused),
            "decisions": None
            if shared is None
            else {
                "published": shared.published,
                "send_dropped": shared.send_dropped,
                "received": shared.received,
                "lost": shared.lost,
                "peers": sorted(self.decisions.peers) if self.decisions is not None else [],
                "peer_predictions": stats.peer_decisions,
                "peer_unknown_replica": stats.peer_unknown_replica,
            },
            "index_entries": len(index),
            "predicted_entries": index.num_predicted(),
            "index_dropped": {
                "unknown_replica": stats.unknown_replica,
                "unknown_group": stats.unknown_group,
                "mismatched_group": stats.mismatched_group,
                "bad_hash": stats.bad_hash,
            },
            "replicas": replicas,
        }

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def _scrape_view(self) -> ScrapeView:
        """What /metrics reads at scrape time: stream stats, index size, queue levels."""
        index = self.core.index
        stats = index.stats
        replicas = []
        for replica_id in sorted(self.replicas):
            stream = self.subscriber.stats(replica_id)
            state = self.core.replicas.get(replica_id)
            load = state.load() if state is not None else ReplicaLoad()
            replicas.append(
                ReplicaView(
                    replica_id=replica_id,
                    stream_state=stream.state.value,
                    stream_counts={
                        name: getattr(stream, name)
                        for name in ("batches", "events", "gaps", "replays", "resyncs", "malformed")
                    },
                    indexed_blocks=index.replica_block_count(replica_id),
                    in_flight=state.in_flight if state is not None else 0,
                    queued_prefill_tokens=load.queued_prefill_tokens,
                    running_seqs=load.active_seqs,
                )
            )
        drops = {
            reason: getattr(stats, reason)
            for reason in ("unknown_replica", "unknown_group", "mismatched_group", "bad_hash")
        }
        return ScrapeView(
            desired_replicas=self.config.engine_count,
            index_entries=len(index),
            index_drops=drops,
            replicas=replicas,
        )

    def record_response(self, endpoint: str, status: int, error_kind: str | None) -> None:
        """Count an HTTP response by endpoint and status, and an error by its kind."""
        self.metrics.http_responses.labels(endpoint, str(status)).inc()
        if error_kind is not None:
            self.metrics.errors.labels(error_kind).inc()

    def predict_hits(self, body: CompletionInput) -> dict[str, int]:
        """Per replica, the prompt tokens it would serve from cache, as known from
        applied events only (no predictions): what `kvroute status` can't show."""
        keys = self.prompt_keys(body)
        self.core.validate(keys, body.max_tokens or 1)
        return self.core.index.predict(keys)

    async def reset_prefix_caches(self) -> bool:
        """Ask every engine to drop its prefix cache (all at once); True if all did.
        Their AllBlocksCleared events then empty the index."""
        links = list(self.replicas.values())
        results = await asyncio.gather(
            *(link.backend.reset_prefix_cache() for link in links), return_exceptions=True
        )
        return all(result is True for result in results)

    def set_policy(self, name: str, **options: Any) -> None:
        """Switch the routing policy (e.g. to replay a workload under a baseline)."""
        self.core.set_policy(make_policy(name, **options))

    # ------------------------------------------------------------- for tests

    def instance_id(self) -> int:
        """This router process's pid: changes when Ray restarts the actor."""
        return os.getpid()

    def replica_ids(self) -> list[str]:
        return sorted(self.replicas)

    async def wait_for_replicas(self, count: int, timeout_s: float = 60.0) -> list[str]:
        """Wait until `count` replicas are routable (an external engine is once it
        answers /health); TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while len(self.replicas) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.replicas)} of {count} replicas registered")
            await asyncio.sleep(0.05)
        return self.replica_ids()
