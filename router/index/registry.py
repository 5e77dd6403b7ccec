"""The index's replica registry: who is registered, with which layout and bit.

Invariants:
- A replica is admitted only if its hash function and seed equal the index's;
  otherwise every lookup would silently miss.
- Each registered replica owns one bit, reused after it leaves.
- `by_signature` and `by_bit` are rebuilt on every admit and release, so a
  prediction does no per-replica work for replicas that hold nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.replicas.kv_cache.coordinator import (
    PrefixHitFinder,
    default_scheduler_block_size,
    eagle_group_ids,
)
from kvroute.replicas.kv_cache.specs import KVCacheConfig
from kvroute.router.index.hit_rules import VLLM_HIT_RULE, HitRule


@dataclass
class ReplicaEntry:
    """What the index knows about one registered replica."""

    replica_id: str
    bit: int
    kv_cache_config: KVCacheConfig
    hash_block_size: int
    finder: PrefixHitFinder
    hit_rule: HitRule
    group_kinds: list[str]
    group_block_sizes: list[int]
    signature: tuple
    # Hash blocks per block of each group.
    group_scales: list[int]


class ReplicaRegistry:
    """Registered replicas by id, by bit, and grouped by identical hit rules."""

    def __init__(self, hash_algo: str, hash_seed: str) -> None:
        self.hash_algo = hash_algo
        self.hash_seed = hash_seed
        self.entries: dict[str, ReplicaEntry] = {}
        self.by_signature: dict[tuple, list[ReplicaEntry]] = {}
        self.by_bit: dict[int, ReplicaEntry] = {}
        self._free_bits: list[int] = []
        self._next_bit = 0

    def admit(
        self,
        replica_id: str,
        kv_cache_config: KVCacheConfig,
        *,
        hash_block_size: int,
        scheduler_block_size: int | None,
        use_eagle: bool,
        hash_algo: str,
        hash_seed: str,
        hit_rule: HitRule = VLLM_HIT_RULE,
    ) -> ReplicaEntry:
        """Register a replica; refused if its id is taken, its hash settings differ
        from the index's, or it has no KV cache group."""
        if replica_id in self.entries:
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
        if self._free_bits:
            bit = self._free_bits.pop()
        else:
            bit = self._next_bit
            self._next_bit += 1
        entry = ReplicaEntry(
            replica_id=replica_id,
            bit=bit,
            kv_cache_config=kv_cache_config,
            hash_block_size=hash_block_size,
            finder=finder,
            hit_rule=hit_rule,
            group_kinds=[g.kv_cache_spec.kind.value for g in groups],
            group_block_sizes=[g.kv_cache_spec.block_size for g in groups],
            group_scales=[g.kv_cache_spec.block_size // hash_block_size for g in groups],
            signature=(
                tuple((g.kv_cache_spec, g.is_eagle_group) for g in groups),
                hash_block_size,
                scheduler_block_size,
                use_eagle,
                hit_rule,
            ),
        )
        self.entries[replica_id] = entry
        self._rebuild_lookups()
        return entry

    def release(self, replica_id: str) -> ReplicaEntry:
        """Unregister a replica; its bit becomes free for the next one."""
        entry = self.require(replica_id)
        del self.entries[replica_id]
        self._free_bits.append(entry.bit)
        self._rebuild_lookups()
        return entry

    @property
    def bit_span(self) -> int:
        """One more than the highest bit ever given out: every bit is below it."""
        return self._next_bit

    def require(self, replica_id: str) -> ReplicaEntry:
        entry = self.entries.get(replica_id)
        if entry is None:
            raise KeyError(f"unknown replica {replica_id!r}")
        return entry

    def _rebuild_lookups(self) -> None:
        self.by_signature = {}
        for entry in self.entries.values():
            self.by_signature.setdefault(entry.signature, []).append(entry)
        self.by_bit = {entry.bit: entry for entry in self.entries.values()}
