"""The router service: event ingest, index, policy and dispatch, as one async actor.

Pipeline (each stage testable alone, this module only wires them):
ZMQ subscriber thread -> `call_soon_threadsafe` -> KVIndex.apply on the event
loop (so the index is single-threaded) -> predict -> policy -> Ray call.

This module keeps the actor's public methods, replica discovery, ingest, load
polling and the request path. It delegates external engines to
`router/external_engines.py`, the router tier's decision channel to
`router/peer_routers.py`, and `/status` and the metrics scrape to
`router/service_views.py`; `self.replicas` (one `ReplicaLink` per routed replica)
is the one map they all read, and only this class writes it.

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
import dataclasses
import functools
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import ray
from ray.exceptions import GetTimeoutError

from kvroute.events.curve import CurveKeyPair
from kvroute.events.kv_events import KVEventBatch
from kvroute.events.sequencer import ResyncReason
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import SubscriberConfig, ZmqEventSubscriber
from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    ReplicaInfo,
    ReplicaLoad,
    StreamChunk,
)
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.router.config import Config
from kvroute.router.core import (
    Decision,
    NoReplicaError,
    PreparedPrompt,
    Registration,
    RequestTimeoutError,
    Router,
    router_settings,
)
from kvroute.router.engines.backends import EngineBackend, ReplicaUnavailableError
from kvroute.router.engines.external import ExternalEngines
from kvroute.router.engines.link import ReplicaLink
from kvroute.router.engines.ray_replica import ACTOR_GONE, RayReplica
from kvroute.router.engines.zmq_replica import ZmqReplica
from kvroute.router.openai.chat import ChatTemplate
from kvroute.router.openai.protocol import CompletionInput, ModelNotFoundError, RoutedResult
from kvroute.router.openai.tokenizer import load_tokenizer, tokenizer_file
from kvroute.router.policy import make_policy
from kvroute.router.service.deadline import Deadline
from kvroute.router.service.decision_log import DecisionLog
from kvroute.router.service.loop_lag import LoopLag
from kvroute.router.service.metrics import RouterMetrics, ScrapeView
from kvroute.router.service.peer_routers import PeerRouters
from kvroute.router.service.probes import ProbeGate
from kvroute.router.service.pushed_loads import Heard, LoadInbox, Working
from kvroute.router.service.views import scrape_view, status_view
from kvroute.router.tier.decisions import DecisionChannelConfig

logger = logging.getLogger(__name__)


ROUTER_NAME = "router"


def replica_actor_name(index: int) -> str:
    return f"replica-{index}"


def router_actor_name(index: int) -> str:
    """Router 0 is the one replicas register with; the others are its peers."""
    return ROUTER_NAME if index == 0 else f"{ROUTER_NAME}-{index}"


# Prompts longer than this (characters) are tokenized on a worker thread, so a large
# body never stalls the loop that serves every other request.
INLINE_TOKENIZE_CHARS = 16 * 1024
# How often a request past its first-token time checks again whether to move.
FIRST_TOKEN_RECHECK_S = 0.1


class _FirstTokenLate(Exception):
    """An attempt got no first token in time and another replica is open: re-dispatch."""


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
        self._curve = curve
        self.config = config
        self.model_name = config.model.name
        policy = make_policy(config.router.policy, **config.router.policy_options)
        self.core = Router(
            router_settings(
                config.router,
                config.hashing,
                config.model,
                config.engine_count,
                hash_algo=config.router_hash_algo,
            ),
            policy,
        )
        tokenizer = tokenizer_file(config.model.tokenizer, config.model.path)
        self.tokenizer = load_tokenizer(tokenizer)
        self.chat_template = ChatTemplate.for_model(Path(tokenizer).parent if tokenizer else None)
        # OpenAI's system_fingerprint: changes whenever the served model's config does.
        model_digest = hashlib.sha256(msgspec.json.encode(config.model)).hexdigest()
        self.fingerprint = f"fp_{model_digest[:12]}"
        self.metrics = RouterMetrics(self._scrape_view)
        self.decisions = DecisionLog(logger)
        self.replicas: dict[str, ReplicaLink] = {}
        self.started_at = time.time()
        self.http_url: str | None = None
        self._http_runner: Any = None
        self._loop = asyncio.get_running_loop()
        self.loop_lag = LoopLag(self._loop, self.metrics.loop_lag_seconds.observe)
        # Per replica: when its last event batch came, and its finished requests then.
        self._events_seen: dict[str, tuple[float, int]] = {}
        # Replicas whose event stream went silent while they served (flagged once).
        self.silent: set[str] = set()
        # Loads replica actors push (subscriber thread -> loop), and when each pushing
        # actor was last heard from (loop time of its last push or answered poll).
        self._pushed_loads = LoadInbox()
        self._heard = Heard(config.router.load_timeout_s)
        self._working = Working(config.router.load_timeout_s)
        self._probes = ProbeGate(config.router.engine_quiet_probe_s)
        self.subscriber = ZmqEventSubscriber(
            self._on_batch_thread,
            self._on_resync_thread,
            SubscriberConfig(rcvhwm=config.events.hwm, curve=curve),
            on_load=self._on_load_thread,
        )
        self.subscriber.start()
        self.name = name
        self.peers: PeerRouters | None = None
        if config.router.share_decisions and config.router.count > 1:
            routers = [router_actor_name(i) for i in range(config.router.count)]
            self.peers = PeerRouters(
                name,
                [peer for peer in routers if peer != name],
                config.cluster.namespace,
                self.core.apply_peer,
                DecisionChannelConfig(
                    endpoint=f"tcp://{config.events.host}:*", hwm=config.events.hwm, curve=curve
                ),
            )
        self._serve_http = serve_http
        self.external = ExternalEngines(
            config, self.model_name, self.replicas, self._admit, self._replica_died, self.core
        )
        self._tasks: list[asyncio.Task[Any]] = []
        self._boot = self._loop.create_task(self._start())

    # ------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        await self._discover_replicas()
        if self._serve_http:
            from kvroute.router.openai.http import HttpOptions, start_http_server

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
                max_connections_per_client=router.max_connections_per_client,
                max_prompts_per_request=router.max_prompts_per_request,
            )
            self.http_url, self._http_runner = await start_http_server(
                self, router.http_host, router.http_port, options
            )
        router = self.config.router
        self._tasks.append(self._loop.create_task(self._poll_loads(False, router.load_poll_s)))
        self._tasks.append(
            self._loop.create_task(self._poll_loads(True, router.engine_load_poll_s))
        )
        self._tasks.append(self._loop.create_task(self._watch_pushed_loads()))
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
        await self.external.discover()
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
            loads=True,
        )
        backend: EngineBackend = RayReplica(handle)
        if self.config.router.data_plane == "zmq" and info.data_endpoint is not None:
            keys = self._curve if info.curve_public_key is not None else None
            backend = ZmqReplica(backend, info.data_endpoint, keys, info.curve_public_key)
        self._admit(registration_of(info), backend, source, info.node_id)

    def _admit(
        self,
        registration: Registration,
        backend: EngineBackend,
        source: SourceSpec,
        node: str | None,
    ) -> None:
        """Index and route to a replica; refused (ValueError) on a hash mismatch."""
        self.core.register(registration)
        self.replicas[registration.replica_id] = ReplicaLink(registration, backend, node)
        self._events_seen[registration.replica_id] = (time.monotonic(), 0)
        self.subscriber.add_source(source)

    def _replica_died(self, replica_id: str) -> None:
        link = self.replicas.pop(replica_id, None)
        if link is None:
            return
        logger.warning("replica %s is gone; removing it from the index", replica_id)
        self.core.remove(replica_id)
        self._events_seen.pop(replica_id, None)
        self._heard.forget(replica_id)
        self._working.forget(replica_id)
        self.silent.discard(replica_id)
        self.subscriber.remove_source(replica_id)
        self._loop.create_task(link.backend.close())

    async def shutdown(self) -> None:
        """Stop serving and following events; idempotent."""
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        for task in self._tasks:
            task.cancel()
        self.loop_lag.stop()
        self.subscriber.stop()
        if self.peers is not None:
            await self.peers.close()
        await self.external.close()

    # --------------------------------------------------------------- ingest

    def _on_batch_thread(self, source: str, seq: int, batch: KVEventBatch) -> None:
        self._loop.call_soon_threadsafe(self._apply, source, batch)

    def _apply(self, source: str, batch: KVEventBatch) -> None:
        link = self.replicas.get(source)
        if link is None:
            return
        state = self.core.replicas.get(source)
        self._events_seen[source] = (time.monotonic(), state.requests if state else 0)
        if source in self.silent:
            self.silent.discard(source)
            logger.info("event stream of %s carries events again", source)
        stats = self.core.index.stats
        misfits = stats.unknown_group + stats.mismatched_group
        self.core.apply(source, batch)
        if not link.external:
            return
        self._working.saw(source, self._loop.time())
        contradiction = self.core.index.contradictions.get(source)
        if contradiction is not None:
            self.external.refuse(source, link.registration, contradiction)
        elif stats.unknown_group + stats.mismatched_group > misfits:
            self.external.refuse(source, link.registration)

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

    def _on_load_thread(self, source: str, load: ReplicaLoad) -> None:
        """A replica actor pushed its load (subscriber thread). Coalesced: the loop is
        called once for every load that arrives while none waits, and applies the
        latest per replica."""
        if self._pushed_loads.put(source, load):
            self._loop.call_soon_threadsafe(self._apply_loads)

    def _apply_loads(self) -> None:
        """Apply pushed loads as an answered poll is applied; the replica is heard."""
        now = self._loop.time()
        for replica_id, load in self._pushed_loads.take().items():
            link = self.replicas.get(replica_id)
            if link is None or link.external:
                continue
            self._heard.pushed(replica_id, now)
            self.core.report_load(replica_id, load)
            self.core.mark_suspect(replica_id, False)

    async def _watch_pushed_loads(self) -> None:
        """Judge late, by `_judge_late`'s rules, every replica actor that pushed its
        load once and has not been heard from (push or poll) for `load_timeout_s`:
        a missed push counts as a missed poll. Looks four times per timeout."""
        heard = self._heard
        while True:
            await asyncio.sleep(heard.timeout_s / 4)
            now = self._loop.time()
            self._judge_late(heard.late(now), len(heard), now - heard.timeout_s)

    async def _poll_loads(self, external: bool, interval: float) -> None:
        """Refresh the load of every replica actor (`external` False) or every external
        engine (True) each `interval`, all at once, so one slow replica delays no
        other's report; then judge the late ones of that group together. Replica actors
        push their loads, so their poll (`load_poll_s`, 1 s) is a correction and a
        liveness check for those not pushing."""
        while True:
            await asyncio.sleep(interval)
            started = self._loop.time()
            links = [
                (rid, link) for rid, link in self.replicas.items() if link.external == external
            ]
            if not links or (external and not self._probes.due("load", started)):
                continue
            late = await asyncio.gather(*(self._poll(rid, link) for rid, link in links))
            missed = [rid for (rid, _), was in zip(links, late, strict=True) if was]
            self._judge_late(missed, len(links), started)

    async def _poll(self, replica_id: str, link: ReplicaLink) -> bool:
        """Ask one replica for its load; True if it did not answer in time."""
        timeout = self.config.router.load_timeout_s
        try:
            load = await asyncio.wait_for(link.backend.load(), timeout=timeout)
        except ReplicaUnavailableError as exc:
            self._backend_failed(replica_id, link, exc)
            return False
        except (TimeoutError, GetTimeoutError):
            # Late, unless its pushes, streams or events show it lives and works.
            now = self._loop.time()
            return not (
                self._heard.lately(replica_id, now) or self._working.lately(replica_id, now)
            )
        self._heard.answered(replica_id, self._loop.time())
        self.core.report_load(replica_id, load)
        self.core.mark_suspect(replica_id, False)
        return False

    def _judge_late(self, late: list[str], polled: int, started: float) -> None:
        """Mark the replicas that missed this round's load report suspect, unless the
        miss says more about the router than about them: its own loop was late by
        `loop_lag_tolerance_s` meanwhile (it could not have read their answers), or
        every replica missed at once (then the core's own accounting routes)."""
        if not late:
            return
        router = self.config.router
        lag = self.loop_lag.max_since(started)
        if lag >= router.loop_lag_tolerance_s:
            logger.info(
                "%d load reports late while the router's own loop was %.2f s late: "
                "no replica is suspected for it",
                len(late),
                lag,
            )
            return
        if len(late) > 1 and len(late) == polled:
            logger.warning(
                "every replica's load report is late at once: routing by the router's "
                "own accounting instead of suspecting them all"
            )
            return
        for replica_id in late:
            state = self.core.replicas.get(replica_id)
            if state is not None and not state.suspect:
                logger.warning(
                    "replica %s did not report its load in %g s: routing around it",
                    replica_id,
                    router.load_timeout_s,
                )
            self.core.mark_suspect(replica_id, True)

    def _backend_failed(
        self, replica_id: str, link: ReplicaLink, error: ReplicaUnavailableError
    ) -> None:
        """An actor that failed is gone (Ray restarts it); an external engine is only
        suspect until its failure lasts `engine_failure_window_s`."""
        if link.external:
            self.external.failed(replica_id, str(error))
        else:
            self._replica_died(replica_id)

    def _check_event_streams(self) -> None:
        """Flag, and log once, a replica that finished requests since its event stream
        last carried a batch, `engine_events_silence_s` ago or more: its endpoint is
        likely wrong or dead, and its entries in the index are going stale."""
        silence = self.config.router.engine_events_silence_s
        now = time.monotonic()
        for replica_id, (seen_at, requests_then) in self._events_seen.items():
            state = self.core.replicas.get(replica_id)
            if state is None or replica_id in self.silent:
                continue
            if now - seen_at >= silence and state.requests > requests_then:
                self.silent.add(replica_id)
                logger.warning(
                    "event stream of %s carried nothing for %.0f s while it served %d "
                    "requests: is its event endpoint right and served?",
                    replica_id,
                    now - seen_at,
                    state.requests - requests_then,
                )

    async def _supervise(self) -> None:
        """Every `supervise_s`, find configured replicas that are not indexed here:
        restarted after a crash, started after this router, or missed at boot; and
        follow the decisions of every peer router, new or restarted."""
        while True:
            await asyncio.sleep(self.config.router.supervise_s)
            # A failing engine is checked at full rate, quiet or not: its recovery,
            # or its removal after `engine_failure_window_s`, is what is awaited.
            now = self._loop.time()
            if self.external.failing or self._probes.due("health", now):
                await self.external.check_health(functools.partial(self._working.lately, now=now))
            self._check_event_streams()
            await self._discover_replicas()
            if self.peers is not None:
                await self.peers.follow()

    def decision_endpoint(self) -> str | None:
        """Where this router publishes its decisions (None: not sharing)."""
        return self.peers.channel.endpoint if self.peers is not None else None

    # -------------------------------------------------------------- routing

    def prompt_keys(self, body: CompletionInput) -> PromptKeys:
        """The body's prompt, tokenized, with the keys its block hashes depend on."""
        tokens = (
            body.token_ids if body.token_ids is not None else self.tokenizer.encode(body.text or "")
        )
        return PromptKeys(tuple(tokens), lora_name=body.lora_name, cache_salt=body.cache_salt)

    async def _prepare(self, body: CompletionInput) -> PreparedPrompt:
        """`prepare`, on a worker thread for a long text prompt (the index and the
        reuse tracker are touched on the loop only: tokenizing is the long part)."""
        if body.text is None or len(body.text) <= INLINE_TOKENIZE_CHARS:
            return self.prepare(body)
        tokens = await asyncio.to_thread(self.tokenizer.encode, body.text)
        return self.prepare(dataclasses.replace(body, text=None, token_ids=tokens))

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
        self._probes.begin(self._loop.time())
        try:
            async for item in self._attempts(body, stream=False):
                routed = item  # exactly one item; run the generator to its end
        finally:
            self._probes.end(self._loop.time())
        assert isinstance(routed, RoutedResult)
        return routed

    async def generate_stream(
        self, body: CompletionInput
    ) -> AsyncIterator[StreamChunk | RoutedResult]:
        """Route and stream: a StreamChunk per engine step, then the RoutedResult.
        A replica that dies before the first chunk is retried elsewhere; one that
        dies mid-stream ends the stream with NoReplicaError."""
        self._probes.begin(self._loop.time())
        try:
            async for item in self._attempts(body, stream=True):
                yield item
        finally:
            self._probes.end(self._loop.time())

    async def _attempts(
        self, body: CompletionInput, stream: bool
    ) -> AsyncIterator[StreamChunk | RoutedResult]:
        """Route and dispatch until one attempt succeeds. A replica that fails before
        the first token is retried on another (`may_retry`); an attempt with no first
        token after `first_token_timeout_s` is moved once to the next-best open
        replica (see `_first_token_watch`). Nothing was relayed yet in either case,
        so no output is ever duplicated."""
        prepared = await self._prepare(body)
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
        moved = False
        while True:
            decision = self.core.choose(prepared, tried)
            self.metrics.routing_seconds.observe(decision.routing_s)
            if self.peers is not None:
                self.peers.share(decision.replica_id, prepared.prompt)
            link = self.replicas[decision.replica_id]
            backend = link.backend
            watch = None if moved else self._first_token_watch(decision.replica_id, tried, stream)
            streamed = ended = refused = False
            within = Deadline(self._loop, self._loop.time() + deadline - time.perf_counter())
            try:
                if stream:
                    items = backend.generate_stream(wire)
                    while True:
                        try:
                            if streamed or watch is None:
                                item = await within.wait(items.__anext__())
                            else:
                                item = await self._first(items.__anext__(), deadline, watch)
                        except StopAsyncIteration:
                            break
                        if isinstance(item, StreamChunk):
                            streamed = True
                            clock.tokens(len(item.new_token_ids))
                            self._working.saw(decision.replica_id, self._loop.time())
                            yield item
                        else:
                            ended = True
                            yield self._finished(decision, item, prepared, link)
                else:
                    if watch is None:
                        result = await within.wait(backend.generate(wire))
                    else:
                        result = await self._first(backend.generate(wire), deadline, watch)
                    ended = True
                    clock.whole(result)
                    yield self._finished(decision, result, prepared, link)
                return
            except _FirstTokenLate:
                logger.info(
                    "request %s had no first token from %s in %g s: moving it",
                    wire.request_id,
                    decision.replica_id,
                    self.config.router.first_token_timeout_s,
                )
                tried.add(decision.replica_id)
                moved = True
                self.metrics.redispatches.inc()
            except ReplicaUnavailableError as exc:
                ended = True
                self.core.release(decision, prepared, refused=False)
                self._backend_failed(decision.replica_id, link, exc)
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
                within.close()
                # Refused, cancelled (the client left), timed out, moved for want of
                # a first token, or cut short by a stop string: the attempt leaves
                # the pending count exactly once, and a replica still working on it
                # is told to stop and free its blocks.
                if not ended:
                    self.core.release(decision, prepared, refused=refused)
                    if not refused:
                        backend.abort(wire.request_id)

    def _first_token_watch(
        self, replica_id: str, tried: set[str], stream: bool
    ) -> Callable[[], bool]:
        """Whether an attempt on `replica_id` still without its first token should
        move now: only if another replica is open to take it, and, for a non-streamed
        request (whose first token the router cannot see), only if `replica_id` is
        suspect too: a long generation on a live replica is left alone."""
        elsewhere = {*tried, replica_id}

        def watch() -> bool:
            if not self.core.open_replicas(elsewhere):
                return False
            return stream or not self.core.is_open(replica_id)

        return watch

    async def _first(self, awaitable: Any, deadline: float, watch: Callable[[], bool]) -> Any:
        """`awaitable`'s result; TimeoutError at `deadline` (perf_counter), and
        _FirstTokenLate once `first_token_timeout_s` has passed and `watch()` says
        so (checked then and every FIRST_TOKEN_RECHECK_S after). No task is made:
        the timeout scope is expired early instead."""
        loop = self._loop
        moved = False
        handle: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal moved, handle
            if watch():
                moved = True
                scope.reschedule(loop.time())
            else:
                handle = loop.call_later(FIRST_TOKEN_RECHECK_S, check)

        try:
            remaining = max(0.0, deadline - time.perf_counter())
            async with asyncio.timeout_at(loop.time() + remaining) as scope:
                handle = loop.call_later(self.config.router.first_token_timeout_s, check)
                return await awaitable
        except TimeoutError:
            if moved:
                raise _FirstTokenLate from None
            raise
        finally:
            if handle is not None:
                handle.cancel()

    def _finished(
        self,
        decision: Decision,
        result: GenerateResult,
        prepared: PreparedPrompt,
        link: ReplicaLink,
    ) -> RoutedResult:
        self.core.finish(decision, result.num_prompt_tokens, result.num_cached_tokens)
        self.decisions.record(
            result.request_id,
            decision.replica_id,
            result.num_prompt_tokens,
            decision.predicted_hit_tokens,
            result.num_cached_tokens,
        )
        if link.external:
            self.external.succeeded(decision.replica_id)
        self.metrics.requests.labels("ok").inc()
        self.metrics.prompt_tokens.inc(result.num_prompt_tokens)
        self.metrics.cached_tokens.inc(result.num_cached_tokens)
        self.metrics.predicted_tokens.inc(decision.predicted_hit_tokens)
        self.metrics.ttft_seconds.observe(result.ttft_s)
        return RoutedResult(
            result=result,
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

    @property
    def refused(self) -> dict[str, str]:
        """External engines refused for events that contradict their layout, and why."""
        return self.external.refused

    def status(self) -> dict[str, Any]:
        channel = self.peers.channel if self.peers is not None else None
        return status_view(
            self.name,
            self.core,
            self.subscriber,
            self.replicas,
            self.refused,
            channel,
            self.silent,
            self.loop_lag.summary(),
        )

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def _scrape_view(self) -> ScrapeView:
        return scrape_view(self.core, self.subscriber, self.replicas, self.config.engine_count)

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
        Each one that did is emptied in the index at once, and its events are
        ignored until its AllBlocksCleared: vLLM publishes that only at its next step,
        and batches from before the reset may still be on their way."""
        links = dict(self.replicas)
        results = await asyncio.gather(
            *(link.backend.reset_prefix_cache() for link in links.values()),
            return_exceptions=True,
        )
        for replica_id, result in zip(links, results, strict=True):
            if result is True and replica_id in self.replicas:
                self.core.index.reset(replica_id, until_cleared=True)
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
