"""A brute-force prefix-hit oracle, independent of `PrefixHitFinder`.

It reads which (hash, group) keys a block manager has cached straight off the
pool's blocks and applies vLLM's prefix-caching rules to every candidate
length, longest first:

- the hit never covers the last prompt token: at most `num_tokens - 1`;
- it is a multiple of the scheduler block size (the lcm of the groups' block
  sizes), so it is a whole number of blocks in every group;
- full attention (and MLA) needs every block before the hit cached;
- a sliding window needs only the blocks holding the `window - 1` tokens
  before the hit (all of them when the hit is shorter than that);
- Mamba needs only the state block that ends at the hit;
- with EAGLE, an attention group also needs the block right after the hit
  (the drafter reads its hidden states), and that block must itself lie
  within the `num_tokens - 1` limit; a Mamba group needs nothing more;
- hybrid: the longest length that every group accepts.

It shares no code with the hit finder: block hashes of larger groups are
rebuilt here, and lookups are plain set membership.
"""

from __future__ import annotations

from math import lcm

from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.specs import (
    FullAttentionSpec,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from kvroute.replicas.request import Request

GROUP_ID_BYTES = 4


def cached_keys(manager: KVCacheManager) -> set[bytes]:
    """Every (hash, group) key the manager's pool holds a block for."""
    return {bytes(b.block_hash) for b in manager.block_pool.blocks if b.block_hash is not None}


def _group_hashes(small: list[bytes], scale: int) -> list[bytes]:
    """Hashes of blocks `scale` hash-blocks long: the concatenation of theirs."""
    return [b"".join(small[i * scale : (i + 1) * scale]) for i in range(len(small) // scale)]


def _accepts(
    spec: KVCacheSpec, cached: list[bool], blocks: int, use_eagle: bool, max_blocks: int
) -> bool:
    """Does a group with these cached block flags accept a hit of `blocks` blocks?"""
    if blocks == 0:
        return True
    if isinstance(spec, MambaSpec):
        return cached[blocks - 1]
    if use_eagle and (blocks + 1 > max_blocks or not cached[blocks]):
        return False
    if isinstance(spec, SlidingWindowSpec):
        need = -(-(spec.sliding_window - 1) // spec.block_size)
        return all(cached[max(0, blocks - need) : blocks])
    if isinstance(spec, FullAttentionSpec):
        return all(cached[:blocks])
    raise NotImplementedError(f"no hit rule for {type(spec).__name__}")


def brute_force_hit(
    manager: KVCacheManager, request: Request, use_eagle: bool, keys: set[bytes] | None = None
) -> int:
    """The longest prefix hit, in tokens, the manager's cached blocks allow.

    `keys` is `cached_keys(manager)`, passed in to share it across prompts.
    """
    if keys is None:
        keys = cached_keys(manager)
    groups = manager.kv_cache_config.kv_cache_groups
    if any(g.is_eagle_group for g in groups):
        raise NotImplementedError("per-group EAGLE flags")
    hash_block_size = min(g.kv_cache_spec.block_size for g in groups)
    small = [bytes(h) for h in request.block_hashes]
    limit = request.num_tokens - 1
    step = lcm(*(g.kv_cache_spec.block_size for g in groups))
    flags: list[tuple[KVCacheSpec, list[bool]]] = []
    for group_id, group in enumerate(groups):
        spec = group.kv_cache_spec
        suffix = group_id.to_bytes(GROUP_ID_BYTES, "big")
        hashes = _group_hashes(small, spec.block_size // hash_block_size)
        flags.append((spec, [h + suffix in keys for h in hashes]))
    for length in range(limit // step * step, -1, -step):
        if all(
            _accepts(spec, cached, length // spec.block_size, use_eagle, limit // spec.block_size)
            for spec, cached in flags
        ):
            return length
    raise AssertionError("a hit of 0 tokens is always accepted")
