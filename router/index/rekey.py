"""Hash-agnostic indexing: an engine's blocks re-keyed by the router's own hash.

An engine's block hashes depend on its hash function and its seed (vLLM draws
NONE_HASH at random unless PYTHONHASHSEED is set), so a router that does not
know them cannot look its prompts up. `BlockStored` carries what the hash was
made of, though: the blocks' token ids, the parent block's hash, and the extra
keys. A `Rekeyer` recomputes each stored block's hash with the router's own
function and seed, chained from its parent's, and rewrites the batch in those
keys, so the rest of the index works as if the engine had hashed like the router.

What an event must carry, per extra key (the hash's key order is LoRA name,
multimodal items, cache salt, prompt-embedding digest):
- token ids: always; an event without them cannot be re-keyed and is dropped.
- LoRA: `extra_keys`, or else `lora_name` (the key is the adapter's name).
- cache salt: `extra_keys` of the prompt's first block. An engine that sends no
  `extra_keys` loses the salt: its salted blocks are then keyed as unsalted.
- multimodal items and prompt embeddings: `extra_keys`, and only where the
  group's block is one hash block (the keys of a larger block cannot be split
  between its hash blocks); other such events are dropped and counted.

Invariants:
- `_blocks[k]` describes the engine block whose event key is `k`: `own`, the
  router's hash of its last hash block, and `key`, that hash's event key; `end`,
  the number of hash blocks from the prompt's start through it; `inner`, its hash
  blocks' hashes when it has several. It is held while any group caches the
  block: `refs` counts its stores minus its removals over all groups.
- Re-keying takes what is known over what it computes: a hash block whose hash
  an earlier event gave (another group's copy of the block, which also saw the
  extra keys of blocks this event skips) is not recomputed.
- The tokens of a BlockStored span every block of its range; the stored blocks
  are the last of those the group can ever hit on (the replica's
  `reachable_block_mask`), since an engine skips only the null blocks that a
  window or Mamba state left at the range's head.
- An event whose parent is unknown is dropped: its chain cannot be rebuilt.
- An event of a group the registration does not know, or of the wrong block
  size, passes unchanged: ingest refuses it and counts why, in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec

from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.single_type import SingleTypeKVCacheManager
from kvroute.replicas.kv_cache.specs import KVCacheSpec
from kvroute.replicas.kv_cache.utils import BlockHash, hash_block_tokens
from kvroute.router.index.ingest import UINT64_MAX, event_hash, event_keys
from kvroute.router.index.registry import ReplicaEntry
from kvroute.router.index.stats import IndexStats

ExtraKeys = tuple[Any, ...] | None
# (first block, end block) -> which blocks of the range the group caches (None: all).
BlockMask = Callable[[int, int], list[bool] | None]


class _Rekeyed(NamedTuple):
    """One block in the router's keys: its hash and that hash's event key, its end
    in hash blocks from the prompt's start, and its hash blocks' hashes when it has
    several."""

    own: BlockHash
    key: int
    end: int
    inner: tuple[BlockHash, ...] | None


class _Block:
    """What is known of one engine block while a group caches it (see the module's
    invariants). One record per block: a removal, nearly every event, is one lookup."""

    __slots__ = ("end", "inner", "key", "own", "refs")

    def __init__(self, mine: _Rekeyed) -> None:
        self.own = mine.own
        self.key = mine.key
        self.end = mine.end
        self.inner = mine.inner
        self.refs = 1

    def rekeyed(self) -> _Rekeyed:
        return _Rekeyed(self.own, self.key, self.end, self.inner)


def engine_event_key(block_hash: int | bytes) -> int | None:
    """The event key of an engine hash as the event carries it (None: malformed)."""
    if type(block_hash) is int and 0 <= block_hash <= UINT64_MAX:
        return block_hash
    if isinstance(block_hash, bytes) and block_hash:
        return event_hash(block_hash)
    return None


class Rekeyer:
    """Per replica: engine event keys -> the router's own hashes of the same blocks."""

    def __init__(
        self,
        entry: ReplicaEntry,
        hash_fn: Callable[[Any], bytes],
        none_hash: BlockHash,
        stats: IndexStats,
    ) -> None:
        self.entry = entry
        self.hash_fn = hash_fn
        self.none_hash = none_hash
        self.stats = stats
        self._blocks: dict[int, _Block] = {}
        finder = entry.finder
        self._masks: dict[int, BlockMask] = {
            group: functools.partial(
                _reachable,
                spec_group.manager_cls,
                spec_group.spec,
                spec_group.use_eagle,
                finder.scheduler_block_size,
            )
            for spec_group in finder.spec_groups
            for group in spec_group.group_ids
        }

    def __len__(self) -> int:
        return len(self._blocks)

    def own_hashes(self) -> dict[int, BlockHash]:
        """Engine event key -> the router's hash of that block, for every block held."""
        return {key: block.own for key, block in self._blocks.items()}

    def clear(self) -> None:
        self._blocks.clear()

    def rekey(self, batch: KVEventBatch) -> KVEventBatch:
        """The batch with every block hash replaced by the router's own key. A run of
        removals from one group and medium (an engine evicts block by block, one
        event each) becomes one event: the index applies them alike."""
        events: list[Any] = []
        source = batch.events
        at, end = 0, len(source)
        while at < end:
            event = source[at]
            kind = type(event)
            at += 1
            if kind is BlockRemoved:
                run_end = at
                while run_end < end and _same_removal_run(source[run_end], event):
                    run_end += 1
                events.extend(self._removed(event, source[at - 1 : run_end]))
                at = run_end
            elif kind is BlockStored:
                stored = self._stored(event)
                if stored is not None:
                    events.append(stored)
            else:
                if kind is AllBlocksCleared:
                    self.clear()
                events.append(event)
        return msgspec.structs.replace(batch, events=events)

    def _scale(self, event: BlockStored | BlockRemoved) -> int | None:
        """Hash blocks per block of the event's group, or None if the registration
        does not know the group as the event describes it."""
        entry = self.entry
        group = event.group_idx if event.group_idx is not None else 0
        if not 0 <= group < len(entry.group_scales):
            return None
        if type(event) is BlockStored and event.block_size != entry.group_block_sizes[group]:
            return None
        return entry.group_scales[group]

    def _stored(self, event: BlockStored) -> BlockStored | None:
        scale = self._scale(event)
        if scale is None:
            return event
        maybe_keys = [engine_event_key(h) for h in event.block_hashes]
        if None in maybe_keys:
            return self._drop(event, "bad_hash", "a malformed block hash")
        keys: list[int] = maybe_keys  # type: ignore[assignment]
        blocks = self._blocks
        held = [blocks.get(key) for key in keys]
        if None not in held:
            # Known from another group's event: the same block has the same hash.
            return self._emit(event, keys, [block.rekeyed() for block in held])  # type: ignore[union-attr]
        rekeyed = self._rehash(event, keys, held, scale)
        if rekeyed is None:
            return None
        for block, mine in zip(held, rekeyed, strict=True):
            if block is not None and block.own != mine.own:
                return self._drop(event, "inconsistent", "blocks that re-key differently")
        return self._emit(event, keys, rekeyed)

    @staticmethod
    def _known_hash_blocks(held: list[_Block | None]) -> dict[int, BlockHash]:
        """Hash-block end -> the router's hash, for every hash block of the event's
        blocks that an earlier event already keyed."""
        known: dict[int, BlockHash] = {}
        for block in held:
            if block is None:
                continue
            hashes = block.inner or (block.own,)
            first = block.end - len(hashes) + 1
            for offset, block_hash in enumerate(hashes):
                known[first + offset] = block_hash
        return known

    def _rehash(
        self, event: BlockStored, keys: list[int], held: list[_Block | None], scale: int
    ) -> list[_Rekeyed] | None:
        """The router's hash of each stored block, with its end and hash blocks."""
        hash_size = self.entry.hash_block_size
        span = scale * hash_size
        tokens = event.token_ids
        blocks = len(tokens) // span
        if not keys or len(tokens) != blocks * span or blocks < len(keys):
            return self._drop(event, "no_tokens", "token ids that do not span its blocks")
        extras = event.extra_keys
        if extras is not None and len(extras) != len(keys):
            return self._drop(event, "bad_extra_keys", "extra_keys of the wrong length")
        if extras is not None and all(block_extras is None for block_extras in extras):
            extras = None  # vLLM lists a None for each block that has no extra keys
        if event.parent_block_hash is None:
            parent, first_block = self.none_hash, 0
        else:
            parent_key = engine_event_key(event.parent_block_hash)
            found = self._blocks.get(parent_key) if parent_key is not None else None
            if found is None or found.end % scale:
                return self._drop(event, "unknown_parent", "a parent block it never stored")
            parent, first_block = found.own, found.end // scale
        mask = self._masks[event.group_idx or 0](first_block, first_block + blocks)
        reachable = [p for p in range(blocks) if mask is None or mask[p]]
        if len(reachable) < len(keys):
            return self._drop(event, "no_tokens", "more blocks than its group can cache")
        stored_at = {p: i for i, p in enumerate(reachable[len(reachable) - len(keys) :])}
        known = self._known_hash_blocks(held)
        lora = _lora_only(event.lora_name)
        if scale == 1 and extras is None and lora is None and not known:
            chained = self._chain(parent, tokens, hash_size)
            if chained is not None:
                own_keys = event_keys(chained).tolist()
                return [
                    _Rekeyed(chained[p], own_keys[p], first_block + p + 1, None) for p in stored_at
                ]
        rekeyed: list[_Rekeyed] = []
        for position in range(blocks):
            stored = stored_at.get(position)
            block_extras = extras[stored] if extras is not None and stored is not None else lora
            first_of_prompt = position == 0 and event.parent_block_hash is None
            sub_extras = _split_extras(block_extras, scale, first_of_prompt, event.lora_name)
            if sub_extras is None:
                return self._drop(event, "unsplittable_extra_keys", "multimodal or embedding keys")
            start = position * span
            end = (first_block + position) * scale
            hashes: list[BlockHash] = []
            for j in range(scale):
                end += 1
                parent = known.get(end) or hash_block_tokens(
                    self.hash_fn,
                    parent,
                    tokens[start + j * hash_size : start + (j + 1) * hash_size],
                    sub_extras[j],
                )
                hashes.append(parent)
            if stored is not None:
                inner = tuple(hashes) if scale > 1 else None
                rekeyed.append(_Rekeyed(parent, event_hash(parent), end, inner))
        return rekeyed

    def _chain(
        self, parent: BlockHash, tokens: Sequence[int], hash_size: int
    ) -> list[BlockHash] | None:
        """Every plain hash block's hash in one call, when the function has a
        compiled chain (equal to hashing block by block); a decoded event's
        `TokenIds` go to it as their uint32 array, never as Python ints."""
        chain = getattr(self.hash_fn, "chain", None)
        return None if chain is None else chain(parent, tokens, 0, hash_size)

    def _emit(self, event: BlockStored, keys: list[int], rekeyed: list[_Rekeyed]) -> BlockStored:
        """Remember each block's keying, and rewrite the event in the router's keys."""
        blocks = self._blocks
        for key, mine in zip(keys, rekeyed, strict=True):
            block = blocks.get(key)
            if block is None:
                blocks[key] = _Block(mine)
            else:
                block.refs += 1
        parent = event.parent_block_hash
        parent_key = engine_event_key(parent) if parent is not None else None
        parent_block = blocks.get(parent_key) if parent_key is not None else None
        return msgspec.structs.replace(
            event,
            block_hashes=[mine.key for mine in rekeyed],
            parent_block_hash=parent_block.key if parent_block is not None else None,
        )

    def _removed(self, first: BlockRemoved, run: Sequence[BlockRemoved]) -> list[BlockRemoved]:
        """One event for a run of removals of `first`'s group and medium (a group
        the registration does not know passes unchanged, for ingest to count)."""
        if self._scale(first) is None:
            return list(run)
        own_keys: list[int] = []
        blocks = self._blocks
        unknown = 0
        for event in run:
            for block_hash in event.block_hashes:
                key = block_hash if type(block_hash) is int else engine_event_key(block_hash)
                block = blocks.get(key) if key is not None else None
                if block is None:
                    unknown += 1
                    continue
                own_keys.append(block.key)
                block.refs -= 1
                if not block.refs:
                    del blocks[key]
        self.stats.removed_unknown += unknown
        return [msgspec.structs.replace(first, block_hashes=own_keys)]

    def _drop(self, event: BlockStored, kind: str, why: str) -> None:
        """Count and log (once per kind) a BlockStored that cannot be re-keyed."""
        self.stats.unkeyable += 1
        self.stats.log_once(
            f"rekey_{kind}",
            "cannot re-key a BlockStored of replica %r (%s): dropping it",
            self.entry.replica_id,
            why,
        )
        return None


def _same_removal_run(event: Any, first: BlockRemoved) -> bool:
    return (
        type(event) is BlockRemoved
        and event.group_idx == first.group_idx
        and event.medium == first.medium
    )


def _reachable(
    manager_cls: type[SingleTypeKVCacheManager],
    spec: KVCacheSpec,
    use_eagle: bool,
    alignment_tokens: int,
    first_block: int,
    end_block: int,
) -> list[bool] | None:
    return manager_cls.reachable_block_mask(
        first_block, end_block, alignment_tokens, spec, use_eagle, None, 0
    )


def _lora_only(lora_name: str | None) -> ExtraKeys:
    return (lora_name,) if lora_name is not None else None


def _split_extras(
    extras: ExtraKeys, scale: int, first_of_prompt: bool, lora_name: str | None
) -> list[ExtraKeys] | None:
    """The extra keys of each of a block's `scale` hash blocks, or None when they
    cannot be told apart. A LoRA name enters every hash block and a cache salt only
    the prompt's first; multimodal and embedding keys belong to token ranges that
    the event does not give, so a block of several hash blocks cannot carry them."""
    if scale == 1:
        return [extras]
    if extras is None:
        return [None] * scale
    lora = (lora_name,) if lora_name is not None and extras[:1] == (lora_name,) else ()
    rest = extras[len(lora) :]
    every = lora or None
    if not rest:
        return [every] * scale
    if first_of_prompt and len(rest) == 1 and isinstance(rest[0], str):
        return [extras] + [every] * (scale - 1)
    return None
