"""The router's global block index, and exact per-replica hit prediction.

Layout: one `BlockTable` per KV cache group index, mapping a block's event
hash (the low 64 bits of the engine's hash, as BlockStored carries it) to a
bitmask of the replicas holding it: a compact open-addressing table of uint64
keys and mask words (8 B per 64 replicas) whose probe loops are compiled by
numba. A lookup is one probe per (block, group) no matter how many replicas
exist; replicas are bits. The table is only ever called with batches: `apply`
gathers each group's consecutive events of one kind (groups are independent,
so interleaved groups still batch) into one call; `predict`
scans a prompt's keys in one call per prefix-closed group, stopping where no
replica holds the prefix any more, and looks a window or state group's keys up
in one call for the whole prompt.

Invariants:
- A replica registers before any of its events are applied; its hash
  function and seed must equal the index's, or every hit would be silently 0.
- A bit is set iff the replica caches that (hash, group) at least once; the
  rare second copy of a hash on one replica is counted in `_extra_copies`, so
  a BlockRemoved of one copy does not clear the bit.
- Predicted entries live in a second table per group, apart from confirmed
  ones, and expire by TTL; a BlockStored or BlockRemoved for the same block
  retires the prediction.
- Prediction runs the replica's own hit rules (`PrefixHitFinder`) against a
  view of this index, so it equals the replica's `get_computed_blocks`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from events.hashing import get_hash_fn_by_name
from events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from replicas.kv_cache.coordinator import (
    PrefixHitFinder,
    default_scheduler_block_size,
    eagle_group_ids,
)
from replicas.kv_cache.specs import KVCacheConfig
from replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from replicas.request import Request
from router.block_table import BlockTable, warm_up
from router.index_view import PromptMasks, ReplicaView

logger = logging.getLogger(__name__)

UINT64_MAX = (1 << 64) - 1
_INT_ONLY = frozenset({int})


@dataclass
class ReplicaEntry:
    """What the index knows about one registered replica."""

    replica_id: str
    bit: int
    kv_cache_config: KVCacheConfig
    hash_block_size: int
    finder: PrefixHitFinder
    group_kinds: list[str]
    group_block_sizes: list[int]
    signature: tuple


@dataclass
class IndexStats:
    """Counters of what the index applied and what it refused."""

    batches: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    unknown_replica: int = 0
    unknown_group: int = 0
    mismatched_group: int = 0
    bad_hash: int = 0
    removed_unknown: int = 0
    predictions_added: int = 0
    predictions_confirmed: int = 0
    predictions_expired: int = 0
    dropped_kinds: set[str] = field(default_factory=set)


def event_hash(block_hash: bytes) -> int:
    """The event form of an engine hash: its last 8 bytes, big-endian."""
    return int.from_bytes(block_hash[-8:], "big")


def event_keys(block_hashes: Sequence[bytes]) -> np.ndarray:
    """`event_hash` of every hash, as uint64. The index's hashes all come from
    one hash function, whose digests share a width, so one strided view of the
    joined bytes reads every key."""
    count = len(block_hashes)
    if not count:
        return np.empty(0, np.uint64)
    width = len(block_hashes[0])
    joined = b"".join(block_hashes)
    if width >= 8 and len(joined) == width * count:
        return np.ndarray((count,), ">u8", joined, width - 8, (width,)).astype(np.uint64)
    return np.array([event_hash(h) for h in block_hashes], np.uint64)


class _EventRun:
    """Keys of consecutive events of one kind and group, and each event's count."""

    __slots__ = ("keys", "kind", "sizes")

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.keys: list[int] = []
        self.sizes: list[int] = []


class KVIndex:
    """Which replica caches which block, for every registered replica."""

    def __init__(
        self,
        hash_algo: str,
        hash_seed: str,
        *,
        prediction_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if hash_seed is None or hash_seed == "":
            raise ValueError("the index needs a fixed hash_seed; a random seed cannot match")
        self.hash_algo = hash_algo
        self.hash_seed = hash_seed
        self.hash_fn = get_hash_fn_by_name(hash_algo)
        self.none_hash = BlockHash(self.hash_fn(hash_seed))
        warm_up()
        self.prediction_ttl_s = prediction_ttl_s
        self.clock = clock
        self.stats = IndexStats()
        self._replicas: dict[str, ReplicaEntry] = {}
        self._free_bits: list[int] = []
        self._next_bit = 0
        self._groups: list[BlockTable] = []
        # (bit, group) -> key -> copies beyond the first
        self._extra_copies: dict[tuple[int, int], dict[int, int]] = {}
        self._predicted: list[BlockTable] = []
        self._expiry: list[tuple[float, int, int, int, list[int]]] = []
        self._expiry_order = 0
        # (bit, group) -> event key -> the deadline of its latest prediction
        self._deadline: dict[tuple[int, int], dict[int, float]] = {}
        self._hashers: dict[int, RequestBlockHasher] = {}
        # Derived from _replicas on every register/remove, so predict() does no
        # per-replica work for replicas that hold nothing.
        self._by_signature: dict[tuple, list[ReplicaEntry]] = {}
        self._by_bit: dict[int, ReplicaEntry] = {}
        self._zeros: dict[str, int] = {}

    # ---------------------------------------------------------------- replicas

    def register(
        self,
        replica_id: str,
        kv_cache_config: KVCacheConfig,
        *,
        hash_block_size: int,
        scheduler_block_size: int | None = None,
        use_eagle: bool = False,
        hash_algo: str,
        hash_seed: str,
        prefix_cache_retention_interval: int | None = None,
    ) -> None:
        """Admit a replica. Refused if its hash settings differ from the index's
        or its id is taken. The retention interval changes which blocks a
        replica caches, not how it looks them up, so it needs no handling here."""
        del prefix_cache_retention_interval
        if replica_id in self._replicas:
            raise ValueError(f"replica {replica_id!r} is already registered")
        if hash_algo != self.hash_algo or hash_seed != self.hash_seed:
            raise ValueError(
                f"replica {replica_id!r} hashes blocks with {hash_algo!r} seed {hash_seed!r}, "
                f"but the router uses {self.hash_algo!r} seed {self.hash_seed!r}: every "
                "lookup would miss. Configure both with the same hash_algo and hash_seed."
            )
        groups = kv_cache_config.kv_cache_groups
        if not groups:
            raise ValueError(f"replica {replica_id!r} has no KV cache groups")
        if scheduler_block_size is None:
            scheduler_block_size = default_scheduler_block_size(kv_cache_config)
        finder = PrefixHitFinder(
            kv_cache_config,
            hash_block_size,
            scheduler_block_size,
            eagle_group_ids(kv_cache_config, use_eagle),
        )
        bit = self._free_bits.pop() if self._free_bits else self._take_new_bit()
        while len(self._groups) < len(groups):
            self._groups.append(BlockTable())
            self._predicted.append(BlockTable())
        signature = (
            tuple((g.kv_cache_spec, g.is_eagle_group) for g in groups),
            hash_block_size,
            scheduler_block_size,
            use_eagle,
        )
        self._replicas[replica_id] = ReplicaEntry(
            replica_id=replica_id,
            bit=bit,
            kv_cache_config=kv_cache_config,
            hash_block_size=hash_block_size,
            finder=finder,
            group_kinds=[g.kv_cache_spec.kind.value for g in groups],
            group_block_sizes=[g.kv_cache_spec.block_size for g in groups],
            signature=signature,
        )
        self._rebuild_lookups()

    def _rebuild_lookups(self) -> None:
        self._by_signature = {}
        for entry in self._replicas.values():
            self._by_signature.setdefault(entry.signature, []).append(entry)
        self._by_bit = {entry.bit: entry for entry in self._replicas.values()}
        self._zeros = dict.fromkeys(self._replicas, 0)

    def _take_new_bit(self) -> int:
        bit = self._next_bit
        self._next_bit += 1
        return bit

    def remove(self, replica_id: str) -> None:
        """Forget a replica and everything it held (e.g. it died)."""
        entry = self._require(replica_id)
        self._clear_bit(entry.bit, predictions=True)
        del self._replicas[replica_id]
        self._free_bits.append(entry.bit)
        self._rebuild_lookups()

    def reset(self, replica_id: str) -> None:
        """Forget a replica's confirmed blocks but keep it registered (before a
        resync). Its predictions stay: they describe requests still in flight."""
        self._clear_bit(self._require(replica_id).bit, predictions=False)

    def _clear_bit(self, bit: int, predictions: bool) -> None:
        """O(index size): a compiled sweep, acceptable for deaths and resyncs."""
        tables = (*self._groups, *self._predicted) if predictions else self._groups
        for table in tables:
            table.clear_bit(bit)
        for dup in [k for k in self._extra_copies if k[0] == bit]:
            del self._extra_copies[dup]

    def _require(self, replica_id: str) -> ReplicaEntry:
        entry = self._replicas.get(replica_id)
        if entry is None:
            raise KeyError(f"unknown replica {replica_id!r}")
        return entry

    @property
    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    def replica(self, replica_id: str) -> ReplicaEntry:
        return self._require(replica_id)

    def __len__(self) -> int:
        """Number of indexed (hash, group) entries, predictions excluded."""
        return sum(len(t) for t in self._groups)

    def replica_block_count(self, replica_id: str) -> int:
        """Indexed (hash, group) entries held by one replica."""
        bit = self._require(replica_id).bit
        return sum(t.count_bit(bit) for t in self._groups)

    # ------------------------------------------------------------------ events

    def apply(self, replica_id: str, batch: KVEventBatch) -> None:
        """Apply one replica's batch, in order. Events the index cannot map (an
        unknown replica, group, or a group whose kind or block size disagrees
        with the registration) are counted and dropped without touching it."""
        entry = self._replicas.get(replica_id)
        if entry is None:
            self.stats.unknown_replica += 1
            self._log_once("unknown_replica", "dropping events of unknown replica %r", replica_id)
            return
        self.stats.batches += 1
        # Consecutive events of one kind and group become one table call. Runs
        # of different groups touch different tables, so they commute.
        runs: dict[int, _EventRun] = {}
        for event in batch.events:
            kind = type(event)
            if kind is BlockStored or kind is BlockRemoved:
                group = self._group_of(entry, event)
                if group is None:
                    continue
                keys = event.block_hashes
                # Ints are range-checked when the run becomes an array.
                if not _INT_ONLY.issuperset(map(type, keys)):
                    keys = self._keys(keys)
                    if keys is None:
                        continue
                run = runs.get(group)
                if run is None or run.kind is not kind:
                    if run is not None:
                        self._flush(entry.bit, group, run)
                    run = runs[group] = _EventRun(kind)
                run.keys.extend(keys)
                run.sizes.append(len(keys))
            elif kind is AllBlocksCleared:
                self._flush_all(entry.bit, runs)
                self.stats.cleared += 1
                self._clear_bit(entry.bit, predictions=False)
        self._flush_all(entry.bit, runs)

    def _flush_all(self, bit: int, runs: dict[int, _EventRun]) -> None:
        for group, run in runs.items():
            self._flush(bit, group, run)
        runs.clear()

    def _flush(self, bit: int, group: int, run: _EventRun) -> None:
        try:
            batch = np.array(run.keys, np.uint64)
        except OverflowError:
            batch = np.array(self._in_range(run), np.uint64)
        if run.kind is BlockStored:
            self._store(bit, group, batch)
        else:
            self._remove(bit, group, batch)

    def _in_range(self, run: _EventRun) -> list[int]:
        """The run's keys without the events holding an int outside uint64."""
        keys: list[int] = []
        start = 0
        for size in run.sizes:
            event_keys = self._keys(run.keys[start : start + size])
            if event_keys is not None:
                keys.extend(event_keys)
            start += size
        return keys

    def _group_of(self, entry: ReplicaEntry, event: BlockStored | BlockRemoved) -> int | None:
        group = event.group_idx
        if group is None:
            if len(entry.group_kinds) != 1:
                self.stats.unknown_group += 1
                self._log_once(
                    "no_group", "dropping an untagged event of hybrid replica %r", entry.replica_id
                )
                return None
            group = 0
        if not 0 <= group < len(entry.group_kinds):
            self.stats.unknown_group += 1
            self._log_once(
                "unknown_group",
                "dropping events of group %s unknown to replica %r",
                group,
                entry.replica_id,
            )
            return None
        if type(event) is BlockStored and (
            (
                event.kv_cache_spec_kind is not None
                and event.kv_cache_spec_kind != entry.group_kinds[group]
            )
            or event.block_size != entry.group_block_sizes[group]
        ):
            self.stats.mismatched_group += 1
            self._log_once(
                "mismatched_group",
                "dropping BlockStored for group %s of %r: kind %r / block size %s do not match "
                "the registration (%r / %s)",
                group,
                entry.replica_id,
                event.kv_cache_spec_kind,
                event.block_size,
                entry.group_kinds[group],
                entry.group_block_sizes[group],
            )
            return None
        return group

    def _keys(self, block_hashes: Sequence[int | bytes]) -> list[int] | None:
        """The event's keys, or None (counted) if any hash is malformed."""
        keys = []
        for h in block_hashes:
            if type(h) is int and 0 <= h <= UINT64_MAX:
                keys.append(h)
            elif isinstance(h, bytes) and h:
                keys.append(event_hash(h))
            else:
                self.stats.bad_hash += 1
                self._log_once("bad_hash", "dropping an event with a malformed block hash %r", h)
                return None
        return keys

    def _store(self, bit: int, group: int, batch: np.ndarray) -> None:
        stored = batch.size
        predicted = self._predicted[group]
        if len(predicted):
            self.stats.predictions_confirmed += predicted.discard(batch, bit)
        held = self._groups[group].store(batch, bit)
        if held.size:
            extra = self._extra_copies.setdefault((bit, group), {})
            for key in held.tolist():
                extra[key] = extra.get(key, 0) + 1
        self.stats.stored_blocks += stored

    def _remove(self, bit: int, group: int, batch: np.ndarray) -> None:
        removed = batch.size
        predicted = self._predicted[group]
        if len(predicted):
            predicted.discard(batch, bit)
        extra = self._extra_copies.get((bit, group))
        if extra:
            # A removed second copy leaves the bit set. Copies only go down
            # within a run, so deciding them before the table call is exact.
            single = []
            for key in batch.tolist():
                copies = extra.get(key)
                if copies is None:
                    single.append(key)
                elif copies == 1:
                    del extra[key]
                else:
                    extra[key] = copies - 1
            if not extra:
                del self._extra_copies[(bit, group)]
            batch = np.array(single, np.uint64)
        cleared = self._groups[group].discard(batch, bit)
        self.stats.removed_unknown += batch.size - cleared
        self.stats.removed_blocks += removed

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        if kind not in self.stats.dropped_kinds:
            self.stats.dropped_kinds.add(kind)
            logger.warning(message, *args)

    # ------------------------------------------------------------- prediction

    def hasher(self, hash_block_size: int) -> RequestBlockHasher:
        """A request hasher with the index's function and seed."""
        hasher = self._hashers.get(hash_block_size)
        if hasher is None:
            hasher = RequestBlockHasher(hash_block_size, self.hash_fn, self.none_hash)
            self._hashers[hash_block_size] = hasher
        return hasher

    def block_hashes(self, request: Request, hash_block_size: int) -> list[BlockHash]:
        """The request's prompt hashes at `hash_block_size`, reusing its own only if
        its hasher computes what this index's hasher computes; a request built
        without a hasher, or with another function, seed or size, is hashed here."""
        own = self.hasher(hash_block_size)
        if own.computes_same_hashes_as(request._block_hasher):
            return request.block_hashes
        clone = Request(
            request.request_id,
            request.all_token_ids,
            None,
            prompt_embeds=request.prompt_embeds,
            mm_features=request.mm_features,
            lora_request=request.lora_request,
            cache_salt=request.cache_salt,
            block_hasher=own,
        )
        return clone.block_hashes

    def predict(self, request: Request, include_predicted: bool = False) -> dict[str, int]:
        """Per replica, the prompt tokens its `get_computed_blocks` would report as
        computed, given its cache as known from the events applied so far (plus
        unexpired predictions when `include_predicted`)."""
        if not self._replicas:
            return {}
        if include_predicted:
            self._expire_predictions()
        max_length = request.num_tokens - 1
        if max_length <= 0 or request.wants_prompt_logprobs:
            return self._zeros.copy()
        tables = self._groups
        extra = self._predicted if include_predicted else None
        result = self._zeros.copy()
        keys_cache: dict[int, tuple[list[BlockHash], np.ndarray]] = {}
        by_bit = self._by_bit
        for entries in self._by_signature.values():
            first = entries[0]
            cached = keys_cache.get(first.hash_block_size)
            if cached is None:
                hashes = self.block_hashes(request, first.hash_block_size)
                cached = keys_cache[first.hash_block_size] = (hashes, event_keys(hashes))
            hashes, keys = cached
            scales = [size // first.hash_block_size for size in first.group_block_sizes]
            masks = PromptMasks(tables, extra, keys, scales)
            candidates = masks.candidates(first.finder, max_length)
            # Visit only the candidates' bits: replicas holding nothing cost nothing.
            while candidates > 0:
                low = candidates & -candidates
                candidates ^= low
                entry = by_bit.get(low.bit_length() - 1)
                if entry is None or entry.signature != first.signature:
                    continue
                view = ReplicaView(masks, entry.bit)
                _, hit = first.finder.find_longest_cache_hit(view, hashes, max_length)
                result[entry.replica_id] = hit
        return result

    # ------------------------------------------------------------ predictions

    def _group_keys(self, entry: ReplicaEntry, request: Request) -> list[tuple[int, np.ndarray]]:
        """(group, event keys of the prompt's blocks in that group) for each group."""
        small = event_keys(self.block_hashes(request, entry.hash_block_size))
        return [
            (group, np.ascontiguousarray(small[scale - 1 :: scale]))
            for group, scale in enumerate(
                size // entry.hash_block_size for size in entry.group_block_sizes
            )
        ]

    def add_prediction(self, replica_id: str, request: Request) -> int:
        """Record that `replica_id` will cache this prompt's blocks (they are
        treated as held until confirmed, removed, failed or expired). Returns
        the number of (hash, group) entries predicted."""
        entry = self._require(replica_id)
        bit = entry.bit
        expires = self.clock() + self.prediction_ttl_s
        added = 0
        for group, keys in self._group_keys(entry, request):
            fresh = keys[~self._groups[group].holding(keys, bit)]
            if not fresh.size:
                continue
            new_keys = fresh.tolist()
            self._predicted[group].store(fresh, bit)
            deadlines = self._deadline.setdefault((bit, group), {})
            deadlines.update(zip(new_keys, repeat(expires)))
            # One heap entry per request and group, not per block: a long
            # prompt predicts hundreds of blocks.
            self._expiry_order += 1
            heapq.heappush(self._expiry, (expires, self._expiry_order, bit, group, new_keys))
            added += len(new_keys)
        self.stats.predictions_added += added
        return added

    def drop_predictions(self, replica_id: str, request: Request) -> None:
        """Retire a failed request's predictions at once."""
        entry = self._require(replica_id)
        for group, keys in self._group_keys(entry, request):
            self._predicted[group].discard(keys, entry.bit)

    def _expire_predictions(self) -> None:
        now = self.clock()
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            expires, _, bit, group, keys = heapq.heappop(expiry)
            deadline = self._deadline.get((bit, group), {})
            due = []
            for key in keys:
                if deadline.get(key) != expires:
                    continue  # refreshed by a later prediction, or already expired
                del deadline[key]
                due.append(key)
            if due:
                expired = self._predicted[group].discard(np.array(due, np.uint64), bit)
                self.stats.predictions_expired += expired

    def num_predicted(self) -> int:
        self._expire_predictions()
        return sum(len(t) for t in self._predicted)
