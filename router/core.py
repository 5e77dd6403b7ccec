"""The router's core, free of I/O: registration, load, preparation, choice, retries.

The Ray/HTTP service and the simulator are shells around one `Router`: they feed
it registrations, event batches and load reports, and carry out its decisions.
Every routing rule has exactly one definition, here, so a simulated result is the
live router's behaviour.

A request's life in the core:
1. `prepare` validates the prompt against the model's limits, hashes it once
   (`HashedPrompt`) and takes its reuse hint;
2. `choose` predicts every candidate's hit, asks the policy, records the
   prediction and counts the request as pending on the chosen replica;
3. the shell dispatches; then `finish` (success) or `release` (failure) ends the
   attempt. After a replica died, the shell may retry on one not tried yet while
   `may_retry` says so: at most `1 + max_retries` attempts in all.

Invariants:
- A replica is routable only between its `register` and its `remove`.
- Pending load is the router's own count of requests dispatched since the
  replica's last load report; a report replaces it, and every attempt adds
  exactly what its `finish` or `release` takes away.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from kvroute.events.kv_events import KVEventBatch
from kvroute.replicas.api import InvalidRequestError, ModelLimits, ReplicaLoad, validate_generate
from kvroute.replicas.config import HashingConfig, ModelConfig
from kvroute.replicas.kv_cache.prompt import HashedPrompt, PromptKeys, has_extra_keys
from kvroute.replicas.kv_cache.specs import KVCacheConfig
from kvroute.replicas.kv_cache.utils import RequestBlockHasher
from kvroute.router.config import RouterConfig
from kvroute.router.index.dialect import HashDialect
from kvroute.router.index.hit_rules import VLLM_HIT_RULE, HitRule
from kvroute.router.index.kv_index import HashMode, KVIndex, warm_up_ingest
from kvroute.router.policy import Candidate, CandidateColumns, RouteRequest, RoutingPolicy
from kvroute.router.reuse import ReuseTracker
from kvroute.router.tier.peer import PeerDecision


class NoReplicaError(RuntimeError):
    """No live replica can take the request (HTTP 503)."""


class RequestTimeoutError(RuntimeError):
    """The request did not finish within its deadline; it was aborted (HTTP 504)."""


class ReplicasBusyError(RuntimeError):
    """Every live replica is at its admission limit (HTTP 429, retry after a while):
    the router sheds load instead of queueing without bound."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RouterSettings:
    """What the core needs from the cluster config. Build it with `router_settings`:
    every knob the config holds has its one default there (`RouterConfig`)."""

    hash_algo: str
    hash_seed: str
    hash_block_size: int
    prediction_ttl_s: float
    # Remember this many times the cluster's KV blocks of prompt prefixes (0: off).
    reuse_memory: float
    cluster_blocks: int
    max_retries: int
    # Admission: a replica takes no more requests in flight, and no more queued
    # prefill tokens, than these (None: no limit). An idle replica always admits one.
    max_requests_per_replica: int | None
    max_queued_prefill_tokens: int | None
    # Off only in the simulator, to measure what predictions are worth.
    use_predictions: bool = True
    retry_after_s: float = 1.0


def router_settings(
    router: RouterConfig,
    hashing: HashingConfig,
    model: ModelConfig,
    engine_count: int,
    **overrides: Any,
) -> RouterSettings:
    """The core's settings from a config's sections, for `engine_count` engines;
    `overrides` replace single fields (benchmarks and tests)."""
    settings = RouterSettings(
        hash_algo=hashing.algo,
        hash_seed=hashing.seed,
        hash_block_size=model.hash_block_size,
        prediction_ttl_s=router.prediction_ttl_s,
        reuse_memory=router.reuse_memory,
        cluster_blocks=model.num_blocks * engine_count,
        max_retries=router.max_retries,
        max_requests_per_replica=router.max_requests_per_replica,
        max_queued_prefill_tokens=router.max_queued_prefill_tokens,
    )
    return dataclasses.replace(settings, **overrides) if overrides else settings


@dataclass(frozen=True)
class Registration:
    """What a replica tells the router about itself before it publishes."""

    replica_id: str
    kv_cache_config: KVCacheConfig
    hash_block_size: int
    scheduler_block_size: int
    use_eagle: bool
    hash_algo: str
    hash_seed: str
    limits: ModelLimits
    retention_interval: int | None = None
    # "tokens": the index re-keys this replica's blocks from its events' token
    # ids, so its hash function and seed need not match the router's.
    hash_mode: HashMode = "seeded"
    # How its cached blocks become a prompt's computed tokens (its engine kind's rule).
    hit_rule: HitRule = VLLM_HIT_RULE
    # How the engine puts extra keys into its hashes (external engines; None: as the
    # router does, unchecked).
    hash_dialect: HashDialect | None = None


@dataclass
class ReplicaState:
    """The core's view of one replica: its last report, the router's own pending
    count since, and what it served. Setting any field adds the replica's id to
    `watcher` (the router's `LoadColumns.dirty`), so whoever changes a state, the
    columns the policy scores are refreshed before the next choice."""

    registration: Registration
    reported: ReplicaLoad = field(default_factory=ReplicaLoad)
    pending_prefill: int = 0
    pending_seqs: int = 0
    # Requests the last report counted that have finished since: the report is
    # read without them, so a scrape a second old does not keep a replica busy.
    finished_since_report: int = 0
    in_flight: int = 0
    # Missed its last load report: routed around until it answers again.
    suspect: bool = False
    # An external engine whose requests or health checks fail: routed around until
    # one succeeds (or it is removed after a sustained failure).
    failing: bool = False
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    watcher: set[str] | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        watcher = self.__dict__.get("watcher")
        if watcher is not None:
            watcher.add(self.registration.replica_id)

    @property
    def open(self) -> bool:
        """Routable at first choice: neither late with its load nor failing."""
        return not (self.suspect or self.failing)

    def load(self) -> ReplicaLoad:
        """The last report less the requests it counted that have finished since, plus
        what the router sent since (queued, not yet running)."""
        reported = self.reported
        left = max(0, reported.active_seqs - self.finished_since_report)
        running = min(reported.running_seqs, left)
        return msgspec.structs.replace(
            reported,
            queued_prefill_tokens=reported.queued_prefill_tokens + self.pending_prefill,
            running_seqs=running,
            waiting_seqs=left - running + self.pending_seqs,
        )

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class LoadColumns:
    """What `choose` reads of every replica, as arrays whose rows follow the order
    of `Router.replicas`: the load (last report plus pending), in-flight count,
    suspicion and index bit. Rows are refreshed from their `ReplicaState` only when
    it changed (`dirty`), and all of them after a register or remove (`stale`), so
    a choice does no Python step per replica."""

    def __init__(self) -> None:
        self.dirty: set[str] = set()
        self.stale = True
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.queued = np.zeros(0, np.int64)
        self.active = np.zeros(0, np.int64)
        self.kv_usage = np.zeros(0, np.float64)
        self.in_flight = np.zeros(0, np.int64)
        self.closed = np.zeros(0, bool)  # suspect or failing: not open
        self.bits = np.zeros(0, np.intp)

    def refresh(self, replicas: Mapping[str, ReplicaState], index: KVIndex) -> None:
        if self.stale:
            count = len(replicas)
            self.ids = list(replicas)
            self.rows = {rid: row for row, rid in enumerate(self.ids)}
            self.queued = np.zeros(count, np.int64)
            self.active = np.zeros(count, np.int64)
            self.kv_usage = np.zeros(count, np.float64)
            self.in_flight = np.zeros(count, np.int64)
            self.closed = np.zeros(count, bool)
            self.bits = np.fromiter((index.replica(rid).bit for rid in self.ids), np.intp, count)
            self.dirty.update(self.ids)
            self.stale = False
        rows = self.rows
        for rid in self.dirty:
            row = rows.get(rid)
            state = replicas.get(rid)
            if row is None or state is None:
                continue
            load = state.load()
            self.queued[row] = load.queued_prefill_tokens
            self.active[row] = load.active_seqs
            self.kv_usage[row] = load.kv_usage
            self.in_flight[row] = state.in_flight
            self.closed[row] = not state.open
        self.dirty.clear()


@dataclass(frozen=True)
class PreparedPrompt:
    """A validated, hashed request, ready to route (and to retry)."""

    request_id: str
    prompt: HashedPrompt
    max_tokens: int
    reuse_hint_tokens: int

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.prompt.keys.token_ids

    @property
    def num_tokens(self) -> int:
        return self.prompt.num_tokens


@dataclass(frozen=True)
class Decision:
    """One attempt: where the request goes, the hit predicted there, and the
    uncached tokens it adds to that replica's pending prefill."""

    replica_id: str
    predicted_hit_tokens: int
    uncached_tokens: int
    attempt: int
    routing_s: float


def prompt_tokens(token_ids: tuple[int, ...]) -> np.ndarray | None:
    """The prompt's token ids as a uint32 array, converted in one C pass
    (`array("I")`, the cheapest conversion of Python ints, about 8 ns each);
    None if one is not an int in [0, 2**32), or the prompt is empty."""
    try:
        packed = array("I", token_ids)
    except (OverflowError, TypeError):
        return None
    if packed.itemsize != 4 or not packed:
        return None
    return np.frombuffer(packed, np.uint32)


def hash_prompt(
    hasher: RequestBlockHasher, keys: PromptKeys, tokens: np.ndarray | None
) -> HashedPrompt:
    """`keys.hashed_prompt(hasher)`, with a compiled chain (`xxh64_tokens`) reading
    `tokens` (`prompt_tokens` of the keys) as they are. Seeded functions hash the
    Python ints, as vLLM does."""
    if tokens is None or has_extra_keys(keys) or not hasattr(hasher.hash_fn, "chain"):
        return keys.hashed_prompt(hasher)
    hashes = tuple(hasher.hash_new_blocks(keys, tokens, ()))
    return HashedPrompt(keys, hasher, hashes, keys.num_tokens, keys.skip_prefix_cache)


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        policy: RoutingPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.index = KVIndex(
            settings.hash_algo,
            settings.hash_seed,
            prediction_ttl_s=settings.prediction_ttl_s,
            clock=clock,
        )
        self.hasher = self.index.hasher(settings.hash_block_size)
        # Hash two blocks now: a compiled hash (`xxh64_tokens`) loads its machine code
        # on first use, about half a second that the first request would wait.
        keys = PromptKeys((0,) * (2 * settings.hash_block_size))
        keys.hashed_prompt(self.hasher)
        warm_up_ingest()
        self.reuse = ReuseTracker.for_cluster(
            settings.reuse_memory, settings.cluster_blocks, settings.hash_block_size
        )
        self.replicas: dict[str, ReplicaState] = {}
        self.columns = LoadColumns()

    # ------------------------------------------------------------ replicas

    def register(self, registration: Registration) -> None:
        """Admit a replica; refused (ValueError) on a hash mismatch or a taken id."""
        self.index.register(
            registration.replica_id,
            registration.kv_cache_config,
            hash_block_size=registration.hash_block_size,
            scheduler_block_size=registration.scheduler_block_size,
            use_eagle=registration.use_eagle,
            hash_algo=registration.hash_algo,
            hash_seed=registration.hash_seed,
            prefix_cache_retention_interval=registration.retention_interval,
            hash_mode=registration.hash_mode,
            hit_rule=registration.hit_rule,
            hash_dialect=registration.hash_dialect,
        )
        self.replicas[registration.replica_id] = ReplicaState(
            registration, watcher=self.columns.dirty
        )
        self.columns.stale = True

    def remove(self, replica_id: str) -> bool:
        """Forget a replica (it died or left); False if it was not registered."""
        if self.replicas.pop(replica_id, None) is None:
            return False
        self.columns.stale = True
        self.index.remove(replica_id)
        self.policy.forget(replica_id)
        return True

    def apply(self, replica_id: str, batch: KVEventBatch) -> None:
        """Apply a replica's event batch (a batch of an unknown replica is counted
        and dropped by the index)."""
        self.index.apply(replica_id, batch)

    def resync(self, replica_id: str, snapshot: KVEventBatch) -> None:
        """Replace what the index knows of a replica by a full snapshot of its cache."""
        self.index.reset(replica_id)
        self.index.apply(replica_id, snapshot)

    def report_load(self, replica_id: str, load: ReplicaLoad) -> None:
        """A replica's own load report; it already counts what was pending."""
        state = self.replicas.get(replica_id)
        if state is not None:
            state.reported = load
            state.pending_prefill = state.pending_seqs = state.finished_since_report = 0

    def mark_suspect(self, replica_id: str, suspect: bool) -> None:
        """A replica that stops answering (frozen, overloaded, cut off) gets no new
        requests until it answers again; its requests in flight meet their deadlines."""
        state = self.replicas.get(replica_id)
        if state is not None:
            state.suspect = suspect

    def mark_failing(self, replica_id: str, failing: bool) -> None:
        """An engine that failed a request or health check gets no new requests
        while it fails (unless every replica is closed, as for `suspect`)."""
        state = self.replicas.get(replica_id)
        if state is not None:
            state.failing = failing

    def is_open(self, replica_id: str) -> bool:
        state = self.replicas.get(replica_id)
        return state is not None and state.open

    def open_replicas(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Registered replicas outside `exclude` that are neither suspect nor failing."""
        return [rid for rid, state in self.replicas.items() if rid not in exclude and state.open]

    def set_policy(self, policy: RoutingPolicy) -> None:
        self.policy = policy

    def loads(self) -> dict[str, ReplicaLoad]:
        return {rid: state.load() for rid, state in self.replicas.items()}

    # ------------------------------------------------------------- requests

    @property
    def limits(self) -> ModelLimits | None:
        """The model's limits, from the first replica registered: every replica of a
        cluster serves the same model."""
        first = next(iter(self.replicas.values()), None)
        return first.registration.limits if first is not None else None

    def validate(self, keys: PromptKeys, max_tokens: int, tokens: np.ndarray | None = None) -> None:
        """Raise InvalidRequestError naming what the model cannot serve. `tokens`
        (`prompt_tokens` of the keys) gives the token range without a pass over
        the Python ints."""
        limits = self.limits
        if limits is not None:
            bounds = None if tokens is None else (int(tokens.min()), int(tokens.max()))
            validate_generate(
                keys.token_ids, max_tokens, keys.lora_name, limits, token_bounds=bounds
            )

    def prepare(
        self, keys: PromptKeys, max_tokens: int, request_id: str | None = None
    ) -> PreparedPrompt:
        """Validate and hash a request; raises InvalidRequestError naming the problem.
        The tokens are converted to uint32 once, which both checks their range and
        is what a compiled hash chain reads."""
        tokens = prompt_tokens(keys.token_ids)
        self.validate(keys, max_tokens, tokens)
        hashed = hash_prompt(self.hasher, keys, tokens)
        hint = self.reuse.observe(hashed.block_hashes) if self.reuse is not None else 0
        return PreparedPrompt(
            request_id=request_id or f"cmpl-{uuid.uuid4().hex[:16]}",
            prompt=hashed,
            max_tokens=max_tokens,
            reuse_hint_tokens=hint,
        )

    def may_retry(self, attempts_made: int) -> bool:
        """Whether a request that failed `attempts_made` times may try once more."""
        return attempts_made < self.settings.max_retries + 1

    def choose(
        self, prepared: PreparedPrompt, exclude: set[str] | frozenset[str] = frozenset()
    ) -> Decision:
        """The replica for `prepared` among those not in `exclude`, counted as pending
        there. Suspect and failing replicas are chosen only when every one left is:
        a stale view of the whole cluster says more about the router (or the
        machine) than about each replica, so the router then trusts its own
        accounting (admission by requests in flight) rather than refuse traffic.
        Raises NoReplicaError when no replica is left at all."""
        started = time.perf_counter()
        columns = self.columns
        columns.refresh(self.replicas, self.index)
        allowed = np.ones(len(columns.ids), bool)
        for rid in exclude:
            row = columns.rows.get(rid)
            if row is not None:
                allowed[row] = False
        open_rows = allowed & ~columns.closed
        if not open_rows.any():
            open_rows = allowed
        admits = self._admits(columns, prepared)
        rows = np.flatnonzero(open_rows if admits is None else open_rows & admits)
        if not rows.size:
            open_count = int(np.count_nonzero(open_rows))
            if not open_count:
                raise NoReplicaError("no replica is available")
            raise ReplicasBusyError(
                f"all {open_count} replicas are at their admission limit; retry later",
                self.settings.retry_after_s,
            )
        replica_id, hit = self._pick(prepared.prompt, rows)
        state = self.replicas[replica_id]
        uncached = prepared.num_tokens - hit
        state.pending_prefill += uncached
        state.pending_seqs += 1
        state.in_flight += 1
        return Decision(
            replica_id=replica_id,
            predicted_hit_tokens=hit,
            uncached_tokens=uncached,
            attempt=len(exclude) + 1,
            routing_s=time.perf_counter() - started,
        )

    def _admits(self, columns: LoadColumns, prepared: PreparedPrompt) -> np.ndarray | None:
        """Which replicas may take one more request: under both limits, or idle
        (None: every one, as there is no limit)."""
        max_requests = self.settings.max_requests_per_replica
        max_prefill = self.settings.max_queued_prefill_tokens
        if max_requests is None and max_prefill is None:
            return None
        admits = np.ones(len(columns.ids), bool)
        if max_requests is not None:
            admits &= columns.in_flight < max_requests
        if max_prefill is not None:
            admits &= columns.queued + prepared.num_tokens <= max_prefill
        return admits | (columns.in_flight == 0)

    def _pick(self, prompt: HashedPrompt, rows: np.ndarray) -> tuple[str, int]:
        """The policy's choice among `rows` of the columns, and its predicted hit."""
        use_predictions = self.settings.use_predictions
        columns = self.columns
        every = rows.size == len(columns.ids)
        by_bit = self.index.predict_bits(prompt, include_predicted=use_predictions)
        hits = by_bit[columns.bits if every else columns.bits[rows]]
        request = RouteRequest(prompt.num_tokens, prompt.block_hashes)
        choose_row = getattr(self.policy, "choose_row", None)
        if choose_row is not None:
            # Every replica is a candidate most of the time: the columns as they are.
            loads = (
                (columns.queued, columns.active, columns.kv_usage)
                if every
                else (columns.queued[rows], columns.active[rows], columns.kv_usage[rows])
            )
            picked = choose_row(request, CandidateColumns(hits, *loads))
            choice, hit = columns.ids[rows[picked]], int(hits[picked])
        else:
            ids = [columns.ids[row] for row in rows.tolist()]
            candidates = [
                Candidate(rid, hit, self.replicas[rid].load())
                for rid, hit in zip(ids, hits.tolist(), strict=True)
            ]
            choice = self.policy.choose(request, candidates)
            hit = int(hits[ids.index(choice)])
        if use_predictions:
            self.index.add_prediction(choice, prompt)
        return choice, hit

    def finish(self, decision: Decision, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """The attempt succeeded: it leaves the pending count, and its tokens count."""
        state = self._end(decision)
        if state is not None:
            state.requests += 1
            state.prompt_tokens += num_prompt_tokens
            state.cached_tokens += num_cached_tokens

    def release(self, decision: Decision, prepared: PreparedPrompt, *, refused: bool) -> None:
        """The attempt failed. A replica that refused the request will not cache its
        blocks, so their predictions go at once; a dead one's went with it."""
        self._end(decision)
        if refused and decision.replica_id in self.replicas:
            self.index.drop_predictions(decision.replica_id, prepared.prompt)

    def apply_peer(self, peer: PeerDecision) -> int:
        """Record another router's decision: its replica is predicted to cache the
        prompt's blocks, in the same tables, with the same TTL (from now) and the same
        settling by events as this router's own predictions. Pending load is left
        alone: the request is the peer's to finish, and the replica's next load
        report counts it. Returns the (hash, group) entries predicted: 0 with
        predictions off, and for an unknown replica or hash block size (counted in
        `index.stats`)."""
        if not self.settings.use_predictions:
            return 0
        keys = np.array(peer.block_keys, np.uint64)
        return self.index.add_peer_prediction(peer.replica_id, peer.hash_block_size, keys)

    def _end(self, decision: Decision) -> ReplicaState | None:
        state = self.replicas.get(decision.replica_id)
        if state is not None:
            state.in_flight -= 1
            state.pending_prefill = max(0, state.pending_prefill - decision.uncached_tokens)
            # The oldest requests finish first: those the last report already counted.
            if state.finished_since_report < state.reported.active_seqs:
                state.finished_since_report += 1
            else:
                state.pending_seqs = max(0, state.pending_seqs - 1)
        return state


__all__ = [
    "Decision",
    "InvalidRequestError",
    "LoadColumns",
    "NoReplicaError",
    "PreparedPrompt",
    "Registration",
    "ReplicaState",
    "ReplicasBusyError",
    "RequestTimeoutError",
    "Router",
    "RouterSettings",
    "hash_prompt",
    "prompt_tokens",
]
