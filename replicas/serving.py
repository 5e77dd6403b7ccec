"""One replica's serving loop, free of Ray: the engine, its request queues, its events.

The Ray actor (`replicas/actor.py`) and the standalone `kvroute serve-replica`
process both serve through `ReplicaCore`, so there is one serving loop.

The loop runs one step at a time on the caller's event loop, publishes the
step's events right away (as vLLM does after scheduling), sleeps the step's
duration if it was simulated (a torch executor's step already took its time;
the loop then only yields), and resolves the requests that produced tokens.
Because steps and `snapshot()` share the event loop, a snapshot is always
consistent with the publisher's next seq.

With `load_keepalive_s` (the Ray actor sets it), the loop also pushes its load on
the publisher (`ZmqEventPublisher.publish_load`), once per loop turn at most: after a
step that changed it, when it goes idle with a load changed since (an abort), and
unchanged when nothing went out for `load_keepalive_s` (an idle loop wakes for it),
so a router can tell an idle replica from a frozen one. Only the loop pushes: a
frozen loop pushes nothing, and a push that fails kills the loop like any fault.

A request the engine fails (`StepResult.failed`) ends alone with
`RequestFailedError`, its cause logged once with its id. If the loop itself
dies, the error is logged once with the requests in flight, each of them ends
with `EngineDeadError`, `serving` turns False, `load()` and new requests raise
`EngineDeadError`, and `on_death` runs (the Ray actor exits, so Ray restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kvroute.events.kv_events import KVEventBatch, without_token_ids
from kvroute.events.publisher import ZmqEventPublisher
from kvroute.replicas.api import (
    EngineDeadError,
    GenerateRequest,
    GenerateResult,
    ReplicaCounters,
    ReplicaLoad,
    RequestAbortedError,
    RequestFailedError,
    Snapshot,
    StreamChunk,
    lora_request_for,
    validate_sampling,
)
from kvroute.replicas.engine import Engine, RequestOutput, StepResult
from kvroute.replicas.kv_cache.utils import BlockHash
from kvroute.replicas.request import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Flight:
    """A request in the engine: its outputs arrive on `queue` (None: aborted; an
    exception: it failed, raise it)."""

    queue: asyncio.Queue[RequestOutput | Exception | None] = field(default_factory=asyncio.Queue)
    started: bool = False  # produced a token: its prompt is counted


class ReplicaCore:
    """Serves `generate` for many requests at once over one engine.

    `start()` must run on the event loop that will serve; every other method
    runs on that loop too (the engine is single-threaded).

    With `step_in_thread` (a model that really computes), each step runs on one
    worker thread, so the loop keeps answering load, health and metrics while a
    step computes. The engine is touched by one thread at a time: while a step
    runs, admissions wait for it to end (`_engine_free`), aborts are queued and
    applied after it, `load()` answers the load measured after the last step, and
    a prefix-cache reset is refused (False, as while blocks are in use). The loop
    yields once between steps, so waiting admissions always get in.
    """

    def __init__(
        self,
        replica_id: str,
        engine: Engine,
        lora_names: tuple[str, ...] = (),
        publish_token_ids: bool = True,
        on_death: Callable[[], None] | None = None,
        step_in_thread: bool = False,
        load_keepalive_s: float | None = None,
    ) -> None:
        if load_keepalive_s is not None and load_keepalive_s <= 0:
            raise ValueError(f"load_keepalive_s must be positive, got {load_keepalive_s}")
        self.replica_id = replica_id
        self.load_keepalive_s = load_keepalive_s
        self.loads_pushed = 0
        self._pushed: ReplicaLoad | None = None  # the last load pushed
        self._pushed_at = 0.0  # and when (time.monotonic)
        self.step_in_thread = step_in_thread
        self._stepping = False
        self._between_steps: asyncio.Event | None = None
        self._step_future: asyncio.Future[StepResult] | None = None
        self._step_thread: ThreadPoolExecutor | None = None
        self._pending_aborts: set[str] = set()
        self._load = ReplicaLoad()
        self.on_death = on_death
        self.death: BaseException | None = None  # what stopped the loop, once it has
        self.engine = engine
        self.lora_names = lora_names
        self.publish_token_ids = publish_token_ids
        self.publisher: ZmqEventPublisher | None = None
        self.steps = 0
        self._flights: dict[str, _Flight] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._counters = ReplicaCounters()

    @property
    def started(self) -> bool:
        return self._wake is not None

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def start(self, publisher: ZmqEventPublisher | None) -> None:
        """Start publishing (if there is a publisher) and serving."""
        self.publisher = publisher
        if publisher is not None:
            publisher.start()
        self._wake = asyncio.Event()
        self._between_steps = asyncio.Event()
        self._between_steps.set()
        if self.step_in_thread:
            self._step_thread = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    @property
    def serving(self) -> bool:
        """The engine loop is running (it has not crashed nor been stopped)."""
        return self._loop_task is not None and not self._loop_task.done()

    # ---------------------------------------------------------------- requests

    def _admit(self, request: GenerateRequest) -> _Flight:
        """Hand a request to the engine; its outputs arrive on the flight's queue."""
        if self._wake is None:
            raise RuntimeError(f"replica {self.replica_id} is not started")
        self._check_alive()
        sampling = request.sampling
        validate_sampling(sampling, self.engine.config.vocab_size)
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
            lora_request=lora_request_for(request.lora_name, self.lora_names),
            cache_salt=request.cache_salt,
            block_hashes=self._router_hashes(request),
            reuse_hint_tokens=request.reuse_hint_tokens,
        )
        flight = _Flight()
        self._flights[request.request_id] = flight
        self._wake.set()
        return flight

    def _router_hashes(self, request: GenerateRequest) -> list[BlockHash] | None:
        """The router's hashes of the prompt when they are at this engine's hash block
        size and cover only full prompt blocks; else None, and the engine hashes."""
        size = self.engine.hasher.block_size
        hashes = request.prompt_block_hashes
        if request.hash_block_size != size or len(hashes) > len(request.prompt_token_ids) // size:
            return None
        return [BlockHash(h) for h in hashes]

    async def _engine_free(self) -> None:
        """Return once no step runs (at once without `step_in_thread`)."""
        while self._stepping:
            assert self._between_steps is not None
            await self._between_steps.wait()

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        await self._engine_free()
        flight = self._admit(request)
        try:
            while not (out := await self._next(flight, request.request_id)).finished:
                pass
        finally:
            self.abort(request.request_id)
        return self.result(out)

    async def generate_stream(
        self, request: GenerateRequest
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        """A StreamChunk per step that produced tokens (the last one included), then
        the GenerateResult. Closing the iterator early aborts the request."""
        await self._engine_free()
        flight = self._admit(request)
        try:
            while True:
                out = await self._next(flight, request.request_id)
                if out.new_token_ids:
                    yield StreamChunk(
                        out.request_id,
                        out.new_token_ids,
                        out.num_prompt_tokens,
                        out.num_cached_tokens,
                    )
                if out.finished:
                    yield self.result(out)
                    return
        finally:
            self.abort(request.request_id)

    @staticmethod
    async def _next(flight: _Flight, request_id: str) -> RequestOutput:
        out = await flight.queue.get()
        if out is None:
            raise RequestAbortedError(f"request {request_id} was aborted")
        if isinstance(out, Exception):
            raise out
        return out

    def _dead(self) -> EngineDeadError:
        return EngineDeadError(f"the engine of replica {self.replica_id} has stopped")

    def _check_alive(self) -> None:
        if self.death is not None:
            raise self._dead()

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks (the caller left, or timed out): the
        engine drops it before its next step, and a `generate` still waiting on it
        ends with RequestAbortedError. False if it had already finished. Also runs,
        harmlessly, when `generate` ends or is cancelled."""
        flight = self._flights.pop(request_id, None)
        if flight is not None:
            flight.queue.put_nowait(None)
        if self._stepping:
            self._pending_aborts.add(request_id)
            return flight is not None
        aborted = self.engine.abort_request(request_id)
        if aborted and self._wake is not None and self.load_keepalive_s is not None:
            self._wake.set()  # an idle loop pushes the load this changed
        return aborted

    def result(self, out: RequestOutput) -> GenerateResult:
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

    # -------------------------------------------------------------------- loop

    async def _run(self) -> None:
        """Serve until cancelled; a death is logged once and told to every waiter."""
        try:
            await self._serve()
        except Exception as exc:
            self.death = exc
            logger.error(
                "the engine loop of replica %s died in step %d; requests in flight: %s",
                self.replica_id,
                self.steps,
                ", ".join(list(self._flights)[:16]) or "none",
                exc_info=exc,
            )
            flights, self._flights = self._flights, {}
            for flight in flights.values():
                flight.queue.put_nowait(self._dead())
            if self.on_death is not None:
                self.on_death()

    async def _serve(self) -> None:
        assert self._wake is not None
        while True:
            if not self.engine.has_work:
                self._push_load(self.engine.load())
                self._wake.clear()
                await self._idle()
                continue
            result = await self._step()
            self.steps += 1
            self._count_prefix_cache()
            if result.events is not None:
                self.publish(result.events)
            self._push_load(self._load)
            await asyncio.sleep(0.0 if result.duration_is_real else result.duration)
            for request_id, error in result.failed.items():
                logger.error(
                    "request %s failed in the engine of replica %s; it was dropped",
                    request_id,
                    self.replica_id,
                    exc_info=error,
                )
                failed = self._flights.pop(request_id, None)
                if failed is not None:
                    failed.queue.put_nowait(RequestFailedError(request_id))
            for out in result.outputs:
                self._count_output(out)
                flight = self._flights.get(out.request_id)
                if flight is not None:
                    flight.queue.put_nowait(out)
                    if out.finished:
                        self._flights.pop(out.request_id, None)

    async def _step(self) -> StepResult:
        """One engine step: here, or on the step thread with `step_in_thread`. A
        cancelled caller does not stop a step under way; `stop()` waits for it."""
        if self._step_thread is None:
            result = self.engine.step()
        else:
            assert self._between_steps is not None
            self._stepping = True
            self._between_steps.clear()
            loop = asyncio.get_running_loop()
            self._step_future = loop.run_in_executor(self._step_thread, self.engine.step)
            try:
                result = await asyncio.shield(self._step_future)
            finally:
                if self._step_future is not None and self._step_future.done():
                    self._end_step()
        self._load = self.engine.load()
        return result

    def _end_step(self) -> None:
        """The step thread is done with the engine: apply the aborts it queued."""
        self._stepping = False
        self._step_future = None
        for request_id in self._pending_aborts:
            self.engine.abort_request(request_id)
        self._pending_aborts.clear()
        if self._between_steps is not None:
            self._between_steps.set()

    def _count_output(self, out: RequestOutput) -> None:
        """vLLM's counting: a prompt when its first token comes, every token made."""
        counters = self._counters
        counters.generation_tokens += len(out.new_token_ids)
        flight = self._flights.get(out.request_id)
        if flight is not None and not flight.started and out.new_token_ids:
            flight.started = True
            counters.prompt_tokens += out.num_prompt_tokens

    def _count_prefix_cache(self) -> None:
        """Lookups of requests that were not preempted, as vLLM's counters count them
        (only when the engine's cache manager keeps stats)."""
        stats = self.engine.kv_cache.make_prefix_cache_stats()
        if stats is not None:
            self._counters.prefix_cache_queries += stats.queries
            self._counters.prefix_cache_hits += stats.hits

    def publish(self, batch: KVEventBatch) -> None:
        """Send one batch of events now (dropped when there is no publisher)."""
        if self.publisher is None:
            return
        if not self.publish_token_ids:
            batch = without_token_ids(batch)
        self.publisher.publish(batch)

    def _push_load(self, load: ReplicaLoad) -> None:
        """Push `load` if it differs from the last one pushed, or if the keepalive is due."""
        keepalive_s = self.load_keepalive_s
        if keepalive_s is None or self.publisher is None:
            return
        now = time.monotonic()
        if load == self._pushed and now - self._pushed_at < keepalive_s:
            return
        self.publisher.publish_load(load)
        self._pushed = load
        self._pushed_at = now
        self.loads_pushed += 1

    async def _idle(self) -> None:
        """Wait for work, or (pushing loads) until the next keepalive is due."""
        assert self._wake is not None
        if self.load_keepalive_s is None or self.publisher is None:
            await self._wake.wait()
            return
        due = self._pushed_at + self.load_keepalive_s - time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, due)):
                await self._wake.wait()

    # ------------------------------------------------------------------- state

    async def snapshot(self) -> Snapshot:
        """Every cached block as one batch, valid up to the publisher's next seq."""
        await self._engine_free()
        next_seq = self.publisher.next_seq if self.publisher is not None else 0
        return Snapshot(next_seq, self.engine.snapshot_batch())

    def load(self) -> ReplicaLoad:
        """The engine's load; EngineDeadError once the loop has died (not ready)."""
        self._check_alive()
        if self._stepping:
            return self._load
        self._load = self.engine.load()
        return self._load

    def counters(self) -> ReplicaCounters:
        """Totals since start: a copy, safe to keep."""
        c = self._counters
        return ReplicaCounters(
            prompt_tokens=c.prompt_tokens,
            generation_tokens=c.generation_tokens,
            prefix_cache_queries=c.prefix_cache_queries,
            prefix_cache_hits=c.prefix_cache_hits,
        )

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache and publish AllBlocksCleared at once, so a router
        knows before the next request; refused (False) while blocks are in use or
        a step runs."""
        if self._stepping or not self.engine.kv_cache.reset_prefix_cache():
            return False
        batch = self.engine.take_event_batch()
        if batch is not None:
            self.publish(batch)
        return True

    async def stop(self) -> None:
        """Stop the loop, abort every request, close the publisher (idempotent)."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._step_future is not None:
            with contextlib.suppress(Exception):
                await self._step_future
            self._end_step()
        if self._step_thread is not None:
            self._step_thread.shutdown(wait=False)
        for request_id in list(self._flights):
            self.abort(request_id)
        self.close_publisher()

    def close_publisher(self) -> None:
        if self.publisher is not None:
            self.publisher.close()

    def cancel(self) -> None:
        """Stop the loop and close the publisher without awaiting (a sync caller)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._step_thread is not None:
            self._step_thread.shutdown(wait=False)
        self.close_publisher()
