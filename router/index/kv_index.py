"""The router's global block index, and exact per-replica hit prediction.

Layout: one `BlockTable` per KV cache group index, mapping a block's event
hash (the low 64 bits of the engine's hash, as BlockStored carries it) to the
replicas holding it: a compact open-addressing table of uint64 keys with up to
four 2-byte replica ids inline (a bitmask row, 8 B per 64 replicas, for blocks
held more widely) whose probe loops are compiled by numba. A lookup is one probe
per (block, group) no matter how many replicas exist, and answers in bitmasks;
replicas are bits. `KVIndex` composes three parts, each with its own
invariants: the replica registry (`index_registry.py`), event ingest
(`index_ingest.py`) and predicted entries (`index_predictions.py`).

`predict` scans a prompt's keys in one call per prefix-closed group, stopping
where no replica holds the prefix any more, and runs the replica's own hit rules
(`PrefixHitFinder`) against a view of the tables, so a prediction equals the
replica's `get_computed_blocks`.

Prompts come as `PromptKeys`, `HashedPrompt` or anything else with a
`hashed_prompt(hasher)` method (a replica's `Request` has one): the index hashes
a prompt at most once per hash block size, and reuses hashes that were made
with its own function, seed and block size.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec
import numpy as np

from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.events.kv_events import AllBlocksCleared, BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.prompt import HashedPrompt, PromptSource
from kvroute.replicas.kv_cache.specs import KVCacheConfig
from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher
from kvroute.router.index.block_table import BlockTable, warm_up
from kvroute.router.index.dialect import ROUTER_DIALECT, DialectCheck, HashDialect
from kvroute.router.index.hit_rules import VLLM_HIT_RULE, HitRule
from kvroute.router.index.ingest import EventIngest, event_hash, event_keys
from kvroute.router.index.predictions import DEFAULT_PREDICTION_TTL_S, Predictions
from kvroute.router.index.prefix_scan import warm_up as warm_up_scan
from kvroute.router.index.registry import ReplicaEntry, ReplicaRegistry
from kvroute.router.index.rekey import Rekeyer
from kvroute.router.index.stats import IndexStats
from kvroute.router.index.view import PromptMasks, ReplicaView

__all__ = ["HashMode", "IndexStats", "KVIndex", "ReplicaEntry", "event_hash", "event_keys"]

# How a replica's event keys relate to the router's: "seeded" when the replica
# hashes with the router's function and seed (checked at registration), "tokens"
# when the router re-keys each stored block from its token ids (`index_rekey.py`).
HashMode = Literal["seeded", "tokens"]


class KVIndex:
    """Which replica caches which block, for every registered replica."""

    def __init__(
        self,
        hash_algo: str,
        hash_seed: str,
        *,
        prediction_ttl_s: float = DEFAULT_PREDICTION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if hash_seed is None or hash_seed == "":
            raise ValueError("the index needs a fixed hash_seed; a random seed cannot match")
        self.hash_algo = hash_algo
        self.hash_seed = hash_seed
        self.hash_fn = get_hash_fn_by_name(hash_algo)
        self.none_hash = BlockHash(self.hash_fn(hash_seed))
        warm_up()
        warm_up_scan()
        self.prediction_ttl_s = prediction_ttl_s
        self.clock = clock
        self.stats = IndexStats()
        self._registry = ReplicaRegistry(hash_algo, hash_seed)
        self._groups: list[BlockTable] = []
        self._predictions = Predictions(self._groups, self.stats, prediction_ttl_s, clock)
        self._ingest = EventIngest(self._groups, self._predictions, self.stats)
        self._hashers: dict[int, RequestBlockHasher] = {}
        self._rekeyers: dict[str, Rekeyer] = {}
        self._dialect_checks: dict[str, DialectCheck] = {}
        # Replicas whose prefix cache the router reset and whose AllBlocksCleared has
        # not arrived: everything they publish before it predates the reset.
        self._clearing: set[str] = set()
        # Seeded replicas whose hashes contradicted their dialect, and why.
        self.contradictions: dict[str, str] = {}
        # The last prompt's hashes and their event keys: a choice reads them twice
        # (predict, then record the prediction). Holding the hashes keeps the
        # identity check sound.
        self._last_keys: tuple[object, np.ndarray] | None = None

    # ---------------------------------------------------------------- replicas

    def register(
        self,
        replica_id: str,
        kv_cache_config: KVCacheConfig,
        *,
        hash_block_size: int,
        scheduler_block_size: int | None = None,
        use_eagle: bool = False,
        hash_algo: str | None = None,
        hash_seed: str | None = None,
        prefix_cache_retention_interval: int | None = None,
        hash_mode: HashMode = "seeded",
        hit_rule: HitRule = VLLM_HIT_RULE,
        hash_dialect: HashDialect | None = None,
    ) -> None:
        """Admit a replica. Refused if its id is taken or, in "seeded" mode, if its
        hash settings differ from the index's; in "tokens" mode the index re-keys
        its blocks and ignores its hash settings. The retention interval changes
        which blocks a replica caches, not how it looks them up; only re-keying
        needs to know it. A seeded replica with a `hash_dialect` has it checked
        against its first salted or LoRA block (`contradictions` says why it
        failed), and is re-keyed when the dialect is not the router's."""
        if hash_mode == "tokens":
            if prefix_cache_retention_interval is not None:
                raise ValueError(
                    f"replica {replica_id!r}: a retention interval makes which blocks it stores "
                    "depend on each prompt's length, which its events do not carry, so they "
                    "cannot be re-keyed; register it in seeded mode"
                )
            hash_algo, hash_seed = self.hash_algo, self.hash_seed
        elif hash_algo is None or hash_seed is None:
            raise ValueError(f"replica {replica_id!r}: seeded mode needs hash_algo and hash_seed")
        entry = self._registry.admit(
            replica_id,
            kv_cache_config,
            hash_block_size=hash_block_size,
            scheduler_block_size=scheduler_block_size,
            use_eagle=use_eagle,
            hash_algo=hash_algo,
            hash_seed=hash_seed,
            hit_rule=hit_rule,
        )
        foreign = hash_dialect is not None and hash_dialect != ROUTER_DIALECT
        if hash_mode == "tokens" or foreign:
            self._rekeyers[replica_id] = Rekeyer(entry, self.hash_fn, self.none_hash, self.stats)
        if hash_mode == "seeded" and hash_dialect is not None:
            self._dialect_checks[replica_id] = DialectCheck(
                hash_dialect, self.hash_fn, self.none_hash, hash_block_size
            )
        num_groups = len(kv_cache_config.kv_cache_groups)
        while len(self._groups) < num_groups:
            self._groups.append(BlockTable())
        self._predictions.grow(num_groups)

    def remove(self, replica_id: str) -> None:
        """Forget a replica and everything it held (e.g. it died)."""
        bit = self._registry.release(replica_id).bit
        self._rekeyers.pop(replica_id, None)
        self._dialect_checks.pop(replica_id, None)
        self._clearing.discard(replica_id)
        self.contradictions.pop(replica_id, None)
        self._ingest.clear(bit)
        self._predictions.clear_bit(bit)

    def reset(self, replica_id: str, *, until_cleared: bool = False) -> None:
        """Forget a replica's confirmed blocks but keep it registered (before a
        resync). Its predictions stay: they describe requests still in flight.
        `until_cleared` (the replica reset its prefix cache, which it does only with
        no request running): its predictions go too, and its events are stale until
        its AllBlocksCleared arrives (vLLM publishes it at its next step, after any
        batch still in flight), so they are dropped until then."""
        bit = self._registry.require(replica_id).bit
        self._ingest.clear(bit)
        rekeyer = self._rekeyers.get(replica_id)
        if rekeyer is not None:
            rekeyer.clear()
        if until_cleared:
            self._predictions.clear_bit(bit)
            self._clearing.add(replica_id)
        else:
            self._clearing.discard(replica_id)

    @property
    def replica_ids(self) -> list[str]:
        return list(self._registry.entries)

    def replica(self, replica_id: str) -> ReplicaEntry:
        return self._registry.require(replica_id)

    def __len__(self) -> int:
        """Number of indexed (hash, group) entries, predictions excluded."""
        return sum(len(t) for t in self._groups)

    def replica_block_count(self, replica_id: str) -> int:
        """Indexed (hash, group) entries held by one replica."""
        bit = self._registry.require(replica_id).bit
        return sum(t.count_bit(bit) for t in self._groups)

    # ------------------------------------------------------------------ events

    def apply(self, replica_id: str, batch: KVEventBatch) -> None:
        """Apply one replica's batch, in order. Events the index cannot map (an
        unknown replica, group, or a group whose kind or block size disagrees
        with the registration) are counted and dropped without touching it."""
        entry = self._registry.entries.get(replica_id)
        if entry is None:
            self.stats.unknown_replica += 1
            self.stats.log_once(
                "unknown_replica", "dropping events of unknown replica %r", replica_id
            )
            return
        if replica_id in self._clearing:
            cleared = [i for i, e in enumerate(batch.events) if type(e) is AllBlocksCleared]
            if not cleared:
                self.stats.stale_after_reset += 1
                return
            self._clearing.discard(replica_id)
            batch = msgspec.structs.replace(batch, events=batch.events[cleared[-1] :])
        check = self._dialect_checks.get(replica_id)
        if check is not None and not check.settled:
            for event in batch.events:
                reason = check.contradiction(event) if type(event) is BlockStored else None
                if reason is not None:
                    self.contradictions[replica_id] = reason
                    self.stats.log_once(
                        f"dialect_{replica_id}", "replica %r: %s", replica_id, reason
                    )
                    return
        rekeyer = self._rekeyers.get(replica_id)
        if rekeyer is not None:
            batch = rekeyer.rekey(batch)
        self._ingest.apply(entry, batch)

    # ------------------------------------------------------------- prediction

    def hasher(self, hash_block_size: int) -> RequestBlockHasher:
        """A request hasher with the index's function and seed."""
        hasher = self._hashers.get(hash_block_size)
        if hasher is None:
            hasher = RequestBlockHasher(hash_block_size, self.hash_fn, self.none_hash)
            self._hashers[hash_block_size] = hasher
        return hasher

    def hashed(self, prompt: PromptSource, hash_block_size: int) -> HashedPrompt:
        """The prompt's hashes at `hash_block_size` with the index's function and seed,
        reusing the prompt's own when they are the same."""
        return prompt.hashed_prompt(self.hasher(hash_block_size))

    def predict(self, prompt: PromptSource, include_predicted: bool = False) -> dict[str, int]:
        """Per replica, the prompt tokens its `get_computed_blocks` would report as
        computed, given its cache as known from the events applied so far (plus
        unexpired predictions when `include_predicted`)."""
        hits = self.predict_bits(prompt, include_predicted)
        return {entry.replica_id: int(hits[entry.bit]) for entry in self._registry.entries.values()}

    def predict_bits(self, prompt: PromptSource, include_predicted: bool = False) -> np.ndarray:
        """`predict` as an int64 array indexed by replica bit (0 for free bits): the
        form a vectorized policy reads without a per-replica Python step."""
        registry = self._registry
        result = np.zeros(registry.bit_span, np.int64)
        if not registry.entries:
            return result
        if include_predicted:
            self._predictions.expire()
        extra = self._predictions.tables if include_predicted else None
        hashed: dict[int, tuple[HashedPrompt, np.ndarray]] = {}
        by_bit = registry.by_bit
        for entries in registry.by_signature.values():
            first = entries[0]
            cached = hashed.get(first.hash_block_size)
            if cached is None:
                prompt_hashes = self.hashed(prompt, first.hash_block_size)
                keys = self._event_keys(prompt_hashes.block_hashes)
                cached = hashed[first.hash_block_size] = (prompt_hashes, keys)
            prompt_hashes, keys = cached
            max_length = first.hit_rule.max_hit_tokens(prompt_hashes.num_tokens)
            if max_length <= 0 or prompt_hashes.skip_prefix_cache:
                return result
            masks = PromptMasks(self._groups, extra, keys, first.group_scales)
            candidates = masks.candidates(first.finder, max_length)
            # Visit only the candidates' bits: replicas holding nothing cost nothing.
            while candidates > 0:
                low = candidates & -candidates
                candidates ^= low
                entry = by_bit.get(low.bit_length() - 1)
                if entry is None or entry.signature != first.signature:
                    continue
                view = ReplicaView(masks, entry.bit)
                _, hit = first.finder.find_longest_cache_hit(
                    view, prompt_hashes.block_hashes, max_length
                )
                result[entry.bit] = hit
        return result

    # ------------------------------------------------------------ predictions

    def _group_keys(
        self, entry: ReplicaEntry, prompt: PromptSource
    ) -> list[tuple[int, np.ndarray]]:
        """(group, event keys of the prompt's blocks in that group) for each group."""
        hashes = self.hashed(prompt, entry.hash_block_size).block_hashes
        return _by_group(entry, self._event_keys(hashes))

    def _event_keys(self, block_hashes: Sequence[bytes]) -> np.ndarray:
        """`event_keys` of a prompt's hashes, reused for the same hashes (an append-only
        list that grew is converted anew). Callers only read the array."""
        last = self._last_keys
        if last is not None and last[0] is block_hashes and last[1].size == len(block_hashes):
            return last[1]
        keys = event_keys(block_hashes)
        self._last_keys = (block_hashes, keys)
        return keys

    def add_prediction(self, replica_id: str, prompt: PromptSource) -> int:
        """Record that `replica_id` will cache this prompt's blocks (they are
        treated as held until confirmed, removed, failed or expired). Returns
        the number of (hash, group) entries predicted."""
        entry = self._registry.require(replica_id)
        return self._predictions.add(entry.bit, self._group_keys(entry, prompt))

    def drop_predictions(self, replica_id: str, prompt: PromptSource) -> None:
        """Retire a failed request's predictions at once."""
        entry = self._registry.require(replica_id)
        self._predictions.drop(entry.bit, self._group_keys(entry, prompt))

    def add_peer_prediction(self, replica_id: str, hash_block_size: int, keys: np.ndarray) -> int:
        """Record another router's prediction: `replica_id` will cache the blocks whose
        event keys (at `hash_block_size`) are `keys`. Same tables, TTL and settling as
        `add_prediction`. A replica this index does not know, or keys at another hash
        block size than the replica's (hashes do not convert), are counted and ignored.
        Returns the number of (hash, group) entries predicted."""
        stats = self.stats
        entry = self._registry.entries.get(replica_id)
        if entry is None:
            stats.peer_unknown_replica += 1
            stats.log_once(
                "peer_unknown_replica", "ignoring peer decisions for unknown replica %r", replica_id
            )
            return 0
        if hash_block_size != entry.hash_block_size:
            stats.peer_mismatched += 1
            stats.log_once(
                "peer_mismatched",
                "ignoring peer decisions hashed at block size %s; replica %r hashes at %s",
                hash_block_size,
                replica_id,
                entry.hash_block_size,
            )
            return 0
        stats.peer_decisions += 1
        return self._predictions.add(entry.bit, _by_group(entry, keys))

    def num_predicted(self) -> int:
        return len(self._predictions)


def _by_group(entry: ReplicaEntry, small_keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(group, keys of that group's blocks) for each group, from the keys at the
    replica's hash block size: a group block's key is that of its last small block."""
    return [
        (group, np.ascontiguousarray(small_keys[scale - 1 :: scale]))
        for group, scale in enumerate(entry.group_scales)
    ]


@functools.cache
def warm_up_ingest() -> None:
    """Compile the event scan and the batch-apply kernel now, or load them from
    numba's disk cache: compiled cold they take seconds, which the first event batch
    would otherwise spend on the subscriber thread and the router's loop. One stored
    and one removed block through a throwaway index of one replica, in both wire
    encodings: the map encoding (vLLM 0.24+) takes the struct decoder's compiled
    token unpacking instead of the scan."""
    import torch

    from kvroute.events.kv_events import BlockRemoved, KVEventDecoder, WireEncoding, encode_batch
    from kvroute.replicas.kv_cache.specs import FullAttentionSpec, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=4, num_kv_heads=1, head_size=1, dtype=torch.float32)
    index = KVIndex("sha256", "warm-up")
    index.register(
        "warm-up",
        KVCacheConfig(num_blocks=4, kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]),
        hash_block_size=4,
        hash_algo="sha256",
        hash_seed="warm-up",
    )
    batch = KVEventBatch(
        ts=0.0,
        events=[BlockStored([1, 2], None, [], 4, None, None, None), BlockRemoved([1], None)],
    )
    decoder = KVEventDecoder()
    for encoding in WireEncoding:
        index.apply("warm-up", decoder.decode(encode_batch(batch, encoding)))
