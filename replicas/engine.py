"""A vLLM-like continuous-batching engine around `KVCacheManager`.

Each `step()`:
1. marks a new step for the cache manager;
2. schedules running requests first (chunked prefill or one decode token each,
   within the token budget), preempting the newest running request by
   recompute whenever `allocate_slots` cannot fit one;
3. admits waiting requests while budget, sequence slots and memory allow
   (the whole prompt must fit, so an admitted request never starves);
4. has the executor run the step (a real model over the cache manager's
   blocks, or a cost model) and take the tokens it sampled;
5. frees finished requests and drains the cache's events into one batch.

One bad request fails alone. A request whose scheduling, sampling or output
raises is failed (`StepResult.failed`): its blocks past its computed tokens are
dropped from the prefix cache (they were cached unwritten) and freed, and the
step goes on for the rest. A step the executor fails as a whole cannot name its
culprit, so it is run again one request at a time (`_execute_alone`): exact,
because an executor raises before drawing any token and a rerun rewrites the
same KV; only requests that fail alone are failed. The same step again costs one
step per request, paid only when a step fails.

Time comes from an injected clock and the step's duration is returned, never
slept here. A simulated duration is virtual (`duration_is_real` False): the Ray
actor sleeps it, the simulator jumps over it. A torch executor's duration is
the compute time already spent, which nobody sleeps again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvroute.events.kv_events import AllBlocksCleared, BlockStored, KVCacheEvent, KVEventBatch
from kvroute.replicas.api import InvalidRequestError, ModelLimits, ReplicaLoad, validate_generate
from kvroute.replicas.clock import Clock
from kvroute.replicas.executor import Executor, ScheduledRequest, SimulatedExecutor, StepShape
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.utils import (
    BlockHash,
    RequestBlockHasher,
    get_block_hash,
    get_group_id,
    maybe_convert_block_hash,
)
from kvroute.replicas.request import (
    LoRARequest,
    MultiModalFeatureSpec,
    Request,
    RequestStatus,
    SamplingParams,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    vocab_size: int = 32_000
    lora_names: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()  # the model's; stop every request but ignore_eos ones

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be > 0")


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None


@dataclass
class RequestOutput:
    """A request's progress after a step: `new_token_ids` since the last output."""

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    num_preemptions: int = 0


@dataclass
class StepResult:
    start_time: float
    duration: float
    num_scheduled_tokens: int
    outputs: list[RequestOutput]
    events: KVEventBatch | None
    num_preempted: int = 0
    duration_is_real: bool = False  # True: `duration` already elapsed computing
    # Requests that failed in this step, with their error; each is gone from the
    # engine (blocks freed), and only they failed.
    failed: dict[str, Exception] = field(default_factory=dict)


@dataclass
class _Tracked:
    request: Request
    metrics: RequestMetrics
    max_tokens: int
    stop_token_ids: frozenset[int]
    emitted: int = 0
    finish_reason: str | None = field(default=None)


class Engine:
    """Continuous batching over one KVCacheManager."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        config: EngineConfig,
        executor: Executor,
        clock: Clock,
        hasher: RequestBlockHasher,
        data_parallel_rank: int = 0,
    ) -> None:
        if config.max_model_len > kv_cache.max_model_len:
            raise ValueError("engine max_model_len exceeds the cache manager's")
        self.kv_cache = kv_cache
        self.config = config
        self.executor = executor
        self.clock = clock
        self.hasher = hasher
        self.data_parallel_rank = data_parallel_rank
        self.waiting: deque[_Tracked] = deque()
        self.running: list[_Tracked] = []
        self._tracked: dict[str, _Tracked] = {}
        self.num_steps = 0
        self.num_preemptions = 0

    # -------------------------------------------------------------- requests

    def validate(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        lora_request: LoRARequest | None,
    ) -> None:
        """Raise `InvalidRequestError` naming what is wrong with a request."""
        validate_generate(
            prompt_token_ids,
            sampling_params.max_tokens,
            lora_request.lora_name if lora_request else None,
            self.limits,
            sampling_params,
        )

    @property
    def limits(self) -> ModelLimits:
        cfg = self.config
        return ModelLimits(cfg.max_model_len, cfg.vocab_size, cfg.lora_names)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
        mm_features: list[MultiModalFeatureSpec] | None = None,
        arrival_time: float | None = None,
        block_hashes: list[BlockHash] | None = None,
        reuse_hint_tokens: int = 0,
    ) -> Request:
        if request_id in self._tracked:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        self.validate(prompt_token_ids, sampling_params, lora_request)
        request = Request(
            request_id,
            prompt_token_ids,
            sampling_params,
            lora_request=lora_request,
            cache_salt=cache_salt,
            mm_features=mm_features,
            block_hasher=self.hasher,
            block_hashes=block_hashes,
            reuse_hint_tokens=reuse_hint_tokens,
        )
        max_tokens = min(
            sampling_params.max_tokens or 1, self.config.max_model_len - len(prompt_token_ids)
        )
        now = self.clock.now() if arrival_time is None else arrival_time
        stop = set(sampling_params.all_stop_token_ids)
        if not sampling_params.ignore_eos:
            stop.update(self.config.eos_token_ids)
        tracked = _Tracked(request, RequestMetrics(arrival_time=now), max_tokens, frozenset(stop))
        self._tracked[request_id] = tracked
        self.waiting.append(tracked)
        return request

    def take_event_batch(self, ts: float | None = None) -> KVEventBatch | None:
        """The cache's events since the last batch, as one batch (None if there are
        none): after each step, and after a cache reset outside any step."""
        events = self.kv_cache.take_events()
        if not events:
            return None
        return KVEventBatch(
            ts=self.clock.now() if ts is None else ts,
            events=events,
            data_parallel_rank=self.data_parallel_rank,
        )

    def abort_request(self, request_id: str) -> bool:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return False
        if tracked in self.running:
            self.running.remove(tracked)
        else:
            self.waiting.remove(tracked)
        self.kv_cache.free(tracked.request)
        self.executor.forget(request_id)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def load(self) -> ReplicaLoad:
        queued = sum(t.request.num_tokens - t.request.num_computed_tokens for t in self.waiting)
        queued += sum(
            max(t.request.num_prompt_tokens - t.request.num_computed_tokens, 0)
            for t in self.running
        )
        return ReplicaLoad(
            queued_prefill_tokens=queued,
            running_seqs=len(self.running),
            kv_usage=self.kv_cache.usage,
            waiting_seqs=len(self.waiting),
            num_cached_blocks=len(self.kv_cache.block_pool.cached_block_hash_to_block),
        )

    # ------------------------------------------------------------------ step

    def step(self, max_decode_steps: int = 1, deadline: float | None = None) -> StepResult:
        """One scheduler step; or, when every request is decoding and none waits,
        up to `max_decode_steps` decode steps at once, ending by `deadline`.

        The multi-step form is what lets the simulator cross long decode phases
        cheaply: it yields the same tokens, blocks and step times as single
        steps, as long as nothing arrives before `deadline`.
        """
        if max_decode_steps > 1:
            fused = self._fused_decode(max_decode_steps, deadline)
            if fused is not None:
                return fused
        start = self.clock.now()
        self.kv_cache.new_step_starts()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Tracked, int]] = []
        preempted = 0
        failed: dict[str, Exception] = {}

        # 1. Running requests first, in admission order.
        index = 0
        while index < len(self.running) and budget > 0:
            tracked = self.running[index]
            req = tracked.request
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            try:
                scheduled_it, evicted = self._allocate_or_preempt(tracked, num_new)
            except Exception as exc:
                self._fail(tracked, exc, failed)  # leaves `running`: same index next
                continue
            preempted += evicted
            if not scheduled_it:
                break  # it was the newest running request and had to go itself
            scheduled.append((tracked, num_new))
            budget -= num_new
            index += 1

        # 2. Admit waiting requests (none after a preemption this step).
        while (
            self.waiting
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            tracked = self.waiting[0]
            req = tracked.request
            try:
                computed, num_hit = self.kv_cache.get_computed_blocks(req)
                num_new = min(req.num_tokens - num_hit, budget)
                blocks = self.kv_cache.allocate_slots(
                    req, num_new, num_hit, computed, full_sequence_must_fit=True
                )
            except Exception as exc:
                self._fail(tracked, exc, failed)
                continue
            if blocks is None:
                break
            self.waiting.popleft()
            if tracked.metrics.first_scheduled_time is None:
                tracked.metrics.first_scheduled_time = start
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(tracked)
            scheduled.append((tracked, num_new))
            budget -= num_new

        # 3. Execute: run the step, advance each request, take the token of
        #    each request whose known tokens are now all computed.
        num_scheduled = sum(n for _, n in scheduled)
        scheduled, duration, tokens = self._execute(scheduled, failed)
        finish = start + duration
        outputs: list[RequestOutput] = []
        for tracked, num_new in scheduled:
            try:
                output = self._advance(tracked, num_new, tokens, finish)
            except Exception as exc:
                self._fail(tracked, exc, failed)
                continue
            if output is not None:
                outputs.append(output)
        for tracked in [t for t in self.running if t.finish_reason is not None]:
            self.running.remove(tracked)
            self._finish(tracked)
        self.num_steps += 1
        self.num_preemptions += preempted
        events_batch = self.take_event_batch(start)
        return StepResult(
            start_time=start,
            duration=duration,
            num_scheduled_tokens=num_scheduled,
            outputs=outputs,
            events=events_batch,
            num_preempted=preempted,
            duration_is_real=self.executor.measures_time,
            failed=failed,
        )

    def _shape(self, scheduled: Sequence[tuple[_Tracked, int]]) -> StepShape:
        return StepShape(
            prefill_tokens=sum(
                n
                for t, n in scheduled
                if t.request.num_computed_tokens < t.request.num_prompt_tokens
            ),
            decode_seqs=sum(
                1
                for t, n in scheduled
                if t.request.num_computed_tokens >= t.request.num_prompt_tokens
            ),
            kv_blocks_read=sum(
                (t.request.num_computed_tokens + n) // self.kv_cache_block_size
                for t, n in scheduled
            ),
        )

    @staticmethod
    def _batch(scheduled: Sequence[tuple[_Tracked, int]]) -> list[ScheduledRequest]:
        return [
            ScheduledRequest(
                t.request,
                t.request.num_computed_tokens,
                n,
                sample=t.request.num_computed_tokens + n >= t.request.num_tokens,
            )
            for t, n in scheduled
        ]

    def _execute(
        self, scheduled: list[tuple[_Tracked, int]], failed: dict[str, Exception]
    ) -> tuple[list[tuple[_Tracked, int]], float, dict[str, int]]:
        """Run the step: (the requests still in it, its duration, their tokens)."""
        try:
            executed = self.executor.execute(self._batch(scheduled), self._shape(scheduled))
        except Exception as exc:
            if len(scheduled) == 1:
                self._fail(scheduled[0][0], exc, failed)
                return [], 0.0, {}
            logger.warning(
                "a step of %d requests failed (%r); running each alone to find the culprit",
                len(scheduled),
                exc,
            )
            return self._execute_alone(scheduled, failed)
        for tracked, _ in scheduled:
            error = executed.failed.get(tracked.request.request_id)
            if error is not None:
                self._fail(tracked, error, failed)
        kept = [(t, n) for t, n in scheduled if t.request.request_id not in executed.failed]
        return kept, executed.duration, executed.token_ids

    def _execute_alone(
        self, scheduled: list[tuple[_Tracked, int]], failed: dict[str, Exception]
    ) -> tuple[list[tuple[_Tracked, int]], float, dict[str, int]]:
        """The step again, one request at a time, in schedule order; a request
        that fails alone is failed. A later request of the step that hit one of
        its blocks (cached this step, never written) is preempted: it recomputes
        them, from its own tokens, later."""
        kept: list[tuple[_Tracked, int]] = []
        duration = 0.0
        tokens: dict[str, int] = {}
        tainted: set[int] = set()
        for tracked, num_new in scheduled:
            if tainted and self._holds_any(tracked, tainted):
                self.running.remove(tracked)
                self._preempt(tracked)
                continue
            one = [(tracked, num_new)]
            try:
                executed = self.executor.execute(self._batch(one), self._shape(one))
            except Exception as exc:
                tainted |= self._fail(tracked, exc, failed)
                continue
            duration += executed.duration
            error = executed.failed.get(tracked.request.request_id)
            if error is not None:
                self._fail(tracked, error, failed)
                continue
            tokens.update(executed.token_ids)
            kept.append((tracked, num_new))
        return kept, duration, tokens

    def _holds_any(self, tracked: _Tracked, block_ids: set[int]) -> bool:
        return any(
            not block_ids.isdisjoint(group)
            for group in self.kv_cache.get_block_ids(tracked.request.request_id)
        )

    def _advance(
        self, tracked: _Tracked, num_new: int, tokens: dict[str, int], finish: float
    ) -> RequestOutput | None:
        """Count a request's computed tokens; its output if it sampled a token."""
        req = tracked.request
        req.num_computed_tokens += num_new
        if req.num_computed_tokens < req.num_tokens:
            return None  # a prefill chunk that did not reach the end
        token = tokens[req.request_id]
        req.append_output_token_ids(token)
        if tracked.metrics.first_token_time is None:
            tracked.metrics.first_token_time = finish
        if req.num_output_tokens >= tracked.max_tokens:
            tracked.finish_reason = "length"
        elif token in tracked.stop_token_ids:
            tracked.finish_reason = "stop"
        return self._output(tracked, finish)

    def _fail(self, tracked: _Tracked, error: Exception, failed: dict[str, Exception]) -> set[int]:
        """Drop a request the step failed for: its unwritten blocks leave the prefix
        cache, the rest are freed. Returns the ids of the blocks dropped."""
        request_id = tracked.request.request_id
        dropped = self.kv_cache.uncache_uncomputed(tracked.request)
        self.abort_request(request_id)
        failed[request_id] = error
        return dropped

    def _fused_decode(self, max_steps: int, deadline: float | None) -> StepResult | None:
        """k decode steps of an all-decoding batch, or None when not applicable.

        Only a cost-model executor can fuse: its tokens need no computed KV."""
        running = self.running
        executor = self.executor
        if self.waiting or not running or not isinstance(executor, SimulatedExecutor):
            return None
        for tracked in running:
            req = tracked.request
            # Decoding means: one token left to compute and it is an output token
            # (a prefill chunk can also leave exactly one prompt token).
            if (
                req.num_tokens - req.num_computed_tokens != 1
                or req.num_output_tokens == 0
                or tracked.stop_token_ids
            ):
                return None
        start = self.clock.now()
        n = len(running)
        block_size = self.kv_cache_block_size
        computed = [t.request.num_computed_tokens for t in running]

        def shape(j: int) -> StepShape:
            # Step j reads what single step j would: each context plus its new token.
            return StepShape(0, n, sum((c + j + 1) // block_size for c in computed))

        one = executor.step_time(shape(0))
        steps = min(max_steps, min(t.max_tokens - t.request.num_output_tokens for t in running))
        if deadline is not None and one > 0:
            steps = min(steps, max(1, int((deadline - start) / one)))
        if steps <= 1:
            return None
        self.kv_cache.new_step_starts()
        for tracked in running:
            if self.kv_cache.allocate_slots(tracked.request, steps) is None:
                return None  # memory is short: single steps handle preemption
        duration = sum(executor.step_time(shape(j)) for j in range(steps))
        finish = start + duration
        outputs = []
        for tracked in running:
            req = tracked.request
            tokens = [
                executor.sample(req.request_id, req.num_output_tokens + j) for j in range(steps)
            ]
            req.num_computed_tokens += steps
            req.append_output_token_ids(tokens)
            if req.num_output_tokens >= tracked.max_tokens:
                tracked.finish_reason = "length"
            outputs.append(self._output(tracked, finish))
        for tracked in [t for t in running if t.finish_reason is not None]:
            running.remove(tracked)
            self._finish(tracked)
        self.num_steps += steps
        batch = self.take_event_batch(start)
        return StepResult(start, duration, steps * n, outputs, batch)

    @property
    def kv_cache_block_size(self) -> int:
        return self.kv_cache.coordinator.scheduler_block_size

    def _allocate_or_preempt(self, tracked: _Tracked, num_new: int) -> tuple[bool, int]:
        """Fit `num_new` more tokens of a running request, preempting the newest
        running requests until it fits. Returns (scheduled, number preempted)."""
        preempted = 0
        while self.kv_cache.allocate_slots(tracked.request, num_new) is None:
            victim = self.running.pop()
            self._preempt(victim)
            preempted += 1
            if victim is tracked:
                return False, preempted
        return True, preempted

    def _preempt(self, tracked: _Tracked) -> None:
        """Recompute-style preemption: drop its blocks, requeue it at the front."""
        req = tracked.request
        self.kv_cache.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(tracked)

    def _finish(self, tracked: _Tracked) -> None:
        tracked.request.status = RequestStatus.FINISHED
        self.kv_cache.free(tracked.request)
        self._tracked.pop(tracked.request.request_id, None)
        self.executor.forget(tracked.request.request_id)

    def _output(self, tracked: _Tracked, now: float) -> RequestOutput:
        req = tracked.request
        new = req.output_token_ids[tracked.emitted :]
        tracked.emitted = req.num_output_tokens
        finished = tracked.finish_reason is not None
        if finished:
            tracked.metrics.finish_time = now
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=list(new),
            output_token_ids=list(req.output_token_ids) if finished else [],
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            finished=finished,
            finish_reason=tracked.finish_reason,
            metrics=tracked.metrics,
            num_preemptions=req.num_preemptions,
        )

    # --------------------------------------------------------------- resync

    def snapshot_batch(self) -> KVEventBatch:
        """The whole cache as one batch a router can apply after a reset: an
        AllBlocksCleared, then one BlockStored per group with every cached hash."""
        specs = [g.kv_cache_spec for g in self.kv_cache.kv_cache_config.kv_cache_groups]
        events: list[KVCacheEvent] = [AllBlocksCleared()]
        for group, hashes in sorted(self.snapshot().items()):
            spec = specs[group]
            events.append(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=None,
                    token_ids=[],
                    block_size=spec.block_size,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                    group_idx=group,
                    kv_cache_spec_kind=spec.kind.value,
                    kv_cache_spec_sliding_window=spec.event_sliding_window,
                )
            )
        return KVEventBatch(
            ts=self.clock.now(), events=events, data_parallel_rank=self.data_parallel_rank
        )

    def snapshot(self) -> dict[int, list[int]]:
        """Every cached block, as event hashes per group (repeated per copy)."""
        per_group: dict[int, list[int]] = {}
        cache = self.kv_cache.block_pool.cached_block_hash_to_block._cache
        for key, entry in cache.items():
            copies = len(entry) if isinstance(entry, dict) else 1
            event_hash = maybe_convert_block_hash(get_block_hash(key))
            per_group.setdefault(get_group_id(key), []).extend([event_hash] * copies)
        return per_group
