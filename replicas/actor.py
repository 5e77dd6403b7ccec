"""The replica as a Ray actor: one engine, one event publisher.

Lifecycle: `start()` binds the event sockets, registers with the router (a
replica registers before it publishes), then starts the engine loop. The loop
runs one step at a time in the actor's event loop, publishes the step's
events right away (as vLLM does after scheduling), sleeps the step's
duration if it was simulated (a torch executor's step already took its time;
the loop then only yields), and resolves the requests that produced tokens.
Because steps and `snapshot()` share the event loop, a snapshot is always
consistent with the publisher's next seq.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch

from events.curve import CurveKeyPair, CurveServerConfig
from events.kv_events import KVEventBatch, without_token_ids
from events.publisher import PublisherConfig, ZmqEventPublisher
from replicas.api import (
    GenerateRequest,
    GenerateResult,
    ReplicaInfo,
    ReplicaLoad,
    RequestAbortedError,
    Snapshot,
    StreamChunk,
    lora_request_for,
)
from replicas.clock import RealClock
from replicas.config import ReplicaSettings
from replicas.engine import RequestOutput
from replicas.factory import build_engine
from replicas.kv_cache.utils import BlockHash
from replicas.request import SamplingParams

logger = logging.getLogger(__name__)


def _reachable(endpoint: str | None) -> str | None:
    """An endpoint bound on all interfaces, rewritten to this node's address so
    a router on another node can connect to it."""
    if endpoint is None or "://0.0.0.0:" not in endpoint:
        return endpoint
    return endpoint.replace("0.0.0.0", ray.util.get_node_ip_address(), 1)


class ReplicaServer:
    """Serves `generate` for many requests at once over one engine."""

    def __init__(
        self,
        replica_id: str,
        config: ReplicaSettings,
        router_name: str,
        rank: int = 0,
        router_public_key: str | None = None,
    ) -> None:
        if config.events.security == "curve" and router_public_key is None:
            raise ValueError("events.security is curve, but no router public key was given")
        self.replica_id = replica_id
        # This replica's own key pair: its secret never leaves the process.
        self._curve = (
            CurveServerConfig(CurveKeyPair.generate(), frozenset({router_public_key}))
            if router_public_key is not None
            else None
        )
        self.config = config
        self.router_name = router_name
        self.rank = rank
        if config.replicas.executor == "torch":
            # Replicas share the node's cores: each computes with its own few threads.
            torch.set_num_threads(config.replicas.threads)
        self.engine = build_engine(config, RealClock(), seed_offset=rank)
        self._outputs: dict[str, asyncio.Queue[RequestOutput | None]] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[ReplicaInfo] | None = None
        self._publisher: ZmqEventPublisher | None = None
        self._ipc_dir: str | None = None
        self.steps = 0

    def _endpoints(self) -> tuple[str, str]:
        events = self.config.events
        if events.transport == "ipc":
            self._ipc_dir = tempfile.mkdtemp(prefix=f"kvroute-{self.replica_id}-")
            return f"ipc://{self._ipc_dir}/pub", f"ipc://{self._ipc_dir}/replay"
        return f"tcp://{events.host}:*", f"tcp://{events.host}:*"

    async def start(self) -> ReplicaInfo:
        """Bind, register with the router, then start serving and publishing.

        Idempotent, and concurrent calls (the launcher's and a router's supervisor)
        all wait for the one start to finish: none returns before the replica serves.
        """
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> ReplicaInfo:
        pub, replay = self._endpoints()
        events = self.config.events
        self._publisher = ZmqEventPublisher(
            PublisherConfig(
                endpoint=pub,
                replay_endpoint=replay,
                hwm=events.hwm,
                buffer_steps=events.buffer_steps,
                max_queue_size=events.max_queue_size,
                curve=self._curve,
                max_replays_per_s=events.max_replays_per_s,
            )
        )
        info = self.info()
        router = ray.get_actor(self.router_name, namespace=self.config.namespace)
        await router.register_replica.remote(info)
        self._publisher.start()
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return info

    def info(self) -> ReplicaInfo:
        assert self._publisher is not None, "start() binds the endpoints first"
        cfg = self.config
        manager = self.engine.kv_cache
        context = ray.get_runtime_context()
        return ReplicaInfo(
            replica_id=self.replica_id,
            actor_name=self.replica_id,
            namespace=cfg.namespace,
            node_id=context.get_node_id(),
            kv_cache_config=manager.kv_cache_config,
            hash_block_size=cfg.model.hash_block_size,
            scheduler_block_size=manager.coordinator.scheduler_block_size,
            use_eagle=cfg.model.use_eagle,
            hash_algo=cfg.hashing.algo,
            hash_seed=cfg.hashing.seed,
            retention_interval=cfg.replicas.retention_interval,
            limits=self.engine.limits,
            event_endpoint=_reachable(self._publisher.endpoint),
            replay_endpoint=_reachable(self._publisher.replay_endpoint),
            data_parallel_rank=self.rank,
            curve_public_key=self._curve.keys.public_key if self._curve else None,
        )

    def _admit(self, request: GenerateRequest) -> asyncio.Queue[RequestOutput | None]:
        """Hand a request to the engine; its outputs arrive on the returned queue."""
        if self._wake is None:
            raise RuntimeError(f"replica {self.replica_id} is not started")
        sampling = request.sampling
        self.engine.add_request(
            request.request_id,
            request.prompt_token_ids,
            SamplingParams(
                max_tokens=request.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed,
                stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=sampling.ignore_eos,
            ),
            lora_request=lora_request_for(request.lora_name, self.config.model.lora_names),
            cache_salt=request.cache_salt,
            block_hashes=self._router_hashes(request),
            reuse_hint_tokens=request.reuse_hint_tokens,
        )
        queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()
        self._outputs[request.request_id] = queue
        self._wake.set()
        return queue

    def _router_hashes(self, request: GenerateRequest) -> list[BlockHash] | None:
        """The router's hashes of the prompt when they are at this engine's hash block
        size and cover only full prompt blocks; else None, and the engine hashes."""
        size = self.engine.hasher.block_size
        hashes = request.prompt_block_hashes
        if request.hash_block_size != size or len(hashes) > len(request.prompt_token_ids) // size:
            return None
        return [BlockHash(h) for h in hashes]

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        queue = self._admit(request)
        try:
            while not (out := await self._next(queue, request.request_id)).finished:
                pass
        finally:
            self.abort(request.request_id)
        return self._result(out)

    async def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        """Call with num_returns="streaming": a StreamChunk per step that produced
        tokens (the last one included), then the GenerateResult."""
        queue = self._admit(request)
        try:
            while True:
                out = await self._next(queue, request.request_id)
                if out.new_token_ids:
                    yield StreamChunk(
                        out.request_id,
                        out.new_token_ids,
                        out.num_prompt_tokens,
                        out.num_cached_tokens,
                    )
                if out.finished:
                    yield self._result(out)
                    return
        finally:
            self.abort(request.request_id)

    @staticmethod
    async def _next(queue: asyncio.Queue[RequestOutput | None], request_id: str) -> RequestOutput:
        out = await queue.get()
        if out is None:
            raise RequestAbortedError(f"request {request_id} was aborted")
        return out

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks (the caller left, or timed out): the
        engine drops it before its next step, and a `generate` still waiting on it
        ends with RequestAbortedError. False if it had already finished. Also runs,
        harmlessly, when `generate` ends or is cancelled."""
        queue = self._outputs.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(None)
        return self.engine.abort_request(request_id)

    def _result(self, out: RequestOutput) -> GenerateResult:
        m = out.metrics
        assert m.first_token_time is not None and m.finish_time is not None
        return GenerateResult(
            request_id=out.request_id,
            replica_id=self.replica_id,
            output_token_ids=out.output_token_ids,
            finish_reason=out.finish_reason,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            queue_s=(m.first_scheduled_time or m.arrival_time) - m.arrival_time,
            ttft_s=m.first_token_time - m.arrival_time,
            latency_s=m.finish_time - m.arrival_time,
            num_preemptions=out.num_preemptions,
        )

    async def _run(self) -> None:
        assert self._wake is not None and self._publisher is not None
        while True:
            if not self.engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            result = self.engine.step()
            self.steps += 1
            if result.events is not None:
                self._publish(result.events)
            await asyncio.sleep(0.0 if result.duration_is_real else result.duration)
            for out in result.outputs:
                queue = self._outputs.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        self._outputs.pop(out.request_id, None)

    def _publish(self, batch: KVEventBatch) -> None:
        assert self._publisher is not None
        if not self.config.events.publish_token_ids:
            batch = without_token_ids(batch)
        self._publisher.publish(batch)

    def snapshot(self) -> Snapshot:
        """Every cached block as one batch, valid up to the publisher's next seq."""
        assert self._publisher is not None
        return Snapshot(self._publisher.next_seq, self.engine.snapshot_batch())

    def load(self) -> ReplicaLoad:
        return self.engine.load()

    def health(self) -> dict[str, Any]:
        stats = self._publisher.stats if self._publisher else None
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "steps": self.steps,
            "in_flight": len(self._outputs),
            "events_published": stats.published if stats else 0,
            "events_dropped": stats.dropped_queue_full if stats else 0,
        }

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache and publish AllBlocksCleared at once, so the router
        knows before the next request; refused (False) while blocks are in use."""
        if not self.engine.kv_cache.reset_prefix_cache():
            return False
        batch = self.engine.take_event_batch()
        if batch is not None:
            self._publish(batch)
        return True

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._publisher is not None:
            self._publisher.close()
