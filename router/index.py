"""The router's global block index, and exact per-replica hit prediction.

Layout: one dict per KV cache group index, mapping a block's event hash (the
low 64 bits of the engine's hash, as BlockStored carries it) to a bitmask of
the replicas holding it. A lookup is one dict probe per (block, group) no
matter how many replicas exist; replicas are bits.

Invariants:
- A replica registers before any of its events are applied; its hash
  function and seed must equal the index's, or every hit would be silently 0.
- A bit is set iff the replica caches that (hash, group) at least once; the
  rare second copy of a hash on one replica is counted in `_extra_copies`, so
  a BlockRemoved of one copy does not clear the bit.
- Predicted entries live apart from confirmed ones and expire by TTL; a
  BlockStored or BlockRemoved for the same block retires the prediction.
- Prediction runs the replica's own hit rules (`PrefixHitFinder`) against a
  view of this index, so it equals the replica's `get_computed_blocks`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
from router.index_view import PromptMasks, ReplicaView

logger = logging.getLogger(__name__)

UINT64_MAX = (1 << 64) - 1


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
    flag: int = 0


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
        self.prediction_ttl_s = prediction_ttl_s
        self.clock = clock
        self.stats = IndexStats()
        self._replicas: dict[str, ReplicaEntry] = {}
        self._free_bits: list[int] = []
        self._next_bit = 0
        self._groups: list[dict[int, int]] = []
        self._extra_copies: dict[tuple[int, int, int], int] = {}
        self._predicted: list[dict[int, int]] = []
        self._expiry: list[tuple[float, int, int, int, list[int]]] = []
        self._expiry_order = 0
        self._deadline: dict[tuple[int, int, int], float] = {}
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
            self._groups.append({})
            self._predicted.append({})
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
            flag=1 << bit,
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
        """O(index size): a full sweep, acceptable for deaths and resyncs."""
        keep = ~(1 << bit)
        tables = (*self._groups, *self._predicted) if predictions else self._groups
        for table in tables:
            emptied = []
            for key, mask in table.items():
                if mask >> bit & 1:
                    mask &= keep
                    if mask:
                        table[key] = mask
                    else:
                        emptied.append(key)
            for key in emptied:
                del table[key]
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
        return sum(1 for t in self._groups for mask in t.values() if mask >> bit & 1)

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
        for event in batch.events:
            kind = type(event)
            if kind is BlockStored:
                group = self._group_of(entry, event)
                if group is not None:
                    self._store(entry, group, event.block_hashes)
            elif kind is BlockRemoved:
                group = self._group_of(entry, event)
                if group is not None:
                    self._remove(entry.bit, group, event.block_hashes)
            elif kind is AllBlocksCleared:
                self.stats.cleared += 1
                self._clear_bit(entry.bit, predictions=False)

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

    def _store(self, entry: ReplicaEntry, group: int, block_hashes: Sequence[int | bytes]) -> None:
        keys = self._keys(block_hashes)
        if keys is None:
            return
        bit = entry.bit
        flag = entry.flag  # one shared int object: single-holder entries cost no mask
        table = self._groups[group]
        predicted = self._predicted[group]
        get = table.get
        for key in keys:
            mask = get(key, 0)
            if mask & flag:
                dup = (bit, group, key)
                self._extra_copies[dup] = self._extra_copies.get(dup, 0) + 1
            else:
                table[key] = mask | flag if mask else flag
            if predicted:
                self._retire_prediction(predicted, key, flag, confirmed=True)
        self.stats.stored_blocks += len(keys)

    def _remove(self, bit: int, group: int, block_hashes: Sequence[int | bytes]) -> None:
        keys = self._keys(block_hashes)
        if keys is None:
            return
        flag = 1 << bit
        table = self._groups[group]
        predicted = self._predicted[group]
        for key in keys:
            mask = table.get(key, 0)
            if not mask & flag:
                self.stats.removed_unknown += 1
            else:
                dup = (bit, group, key)
                extra = self._extra_copies.get(dup)
                if extra:
                    if extra == 1:
                        del self._extra_copies[dup]
                    else:
                        self._extra_copies[dup] = extra - 1
                elif mask == flag:
                    del table[key]
                else:
                    table[key] = mask & ~flag
            if predicted:
                self._retire_prediction(predicted, key, flag, confirmed=False)
        self.stats.removed_blocks += len(keys)

    def _retire_prediction(
        self, predicted: dict[int, int], key: int, flag: int, confirmed: bool
    ) -> None:
        mask = predicted.get(key, 0)
        if mask & flag:
            if mask == flag:
                del predicted[key]
            else:
                predicted[key] = mask & ~flag
            if confirmed:
                self.stats.predictions_confirmed += 1

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
        """The request's prompt hashes at `hash_block_size`, reusing its own if
        they were made by this index's hasher."""
        if request._block_hasher is self._hashers.get(hash_block_size):
            return request.block_hashes
        clone = Request(
            request.request_id,
            request.all_token_ids,
            None,
            prompt_embeds=request.prompt_embeds,
            mm_features=request.mm_features,
            lora_request=request.lora_request,
            cache_salt=request.cache_salt,
            block_hasher=self.hasher(hash_block_size),
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
        hashes_cache: dict[int, list[BlockHash]] = {}
        by_bit = self._by_bit
        for entries in self._by_signature.values():
            first = entries[0]
            hashes = hashes_cache.get(first.hash_block_size)
            if hashes is None:
                hashes = self.block_hashes(request, first.hash_block_size)
                hashes_cache[first.hash_block_size] = hashes
            masks = PromptMasks(tables, extra)
            candidates = masks.candidates(first.finder, hashes, max_length)
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

    def add_prediction(self, replica_id: str, request: Request) -> int:
        """Record that `replica_id` will cache this prompt's blocks (they are
        treated as held until confirmed, removed, failed or expired). Returns
        the number of (hash, group) entries predicted."""
        entry = self._require(replica_id)
        flag = 1 << entry.bit
        hashes = self.block_hashes(request, entry.hash_block_size)
        expires = self.clock() + self.prediction_ttl_s
        deadline = self._deadline
        added = 0
        for group, block_size in enumerate(entry.group_block_sizes):
            scale = block_size // entry.hash_block_size
            predicted = self._predicted[group]
            confirmed = self._groups[group]
            keys = []
            for i in range(scale - 1, len(hashes), scale):
                key = event_hash(hashes[i])
                if confirmed.get(key, 0) & flag:
                    continue
                predicted[key] = predicted.get(key, 0) | flag
                deadline[(entry.bit, group, key)] = expires
                keys.append(key)
            if keys:
                # One heap entry per request and group, not per block: a long
                # prompt predicts hundreds of blocks.
                self._expiry_order += 1
                heapq.heappush(self._expiry, (expires, self._expiry_order, entry.bit, group, keys))
                added += len(keys)
        self.stats.predictions_added += added
        return added

    def drop_predictions(self, replica_id: str, request: Request) -> None:
        """Retire a failed request's predictions at once."""
        entry = self._require(replica_id)
        flag = 1 << entry.bit
        hashes = self.block_hashes(request, entry.hash_block_size)
        for group, block_size in enumerate(entry.group_block_sizes):
            scale = block_size // entry.hash_block_size
            for i in range(scale - 1, len(hashes), scale):
                self._retire_prediction(self._predicted[group], event_hash(hashes[i]), flag, False)

    def _expire_predictions(self) -> None:
        now = self.clock()
        expiry = self._expiry
        deadline = self._deadline
        while expiry and expiry[0][0] <= now:
            expires, _, bit, group, keys = heapq.heappop(expiry)
            predicted = self._predicted[group]
            flag = 1 << bit
            for key in keys:
                if deadline.get((bit, group, key)) != expires:
                    continue  # refreshed by a later prediction, or already expired
                del deadline[(bit, group, key)]
                mask = predicted.get(key, 0)
                if mask & flag:
                    self.stats.predictions_expired += 1
                    if mask == flag:
                        del predicted[key]
                    else:
                        predicted[key] = mask & ~flag

    def num_predicted(self) -> int:
        self._expire_predictions()
        return sum(len(t) for t in self._predicted)
