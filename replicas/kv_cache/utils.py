"""Blocks, block hashes and the request block hasher.

A block hash chains its parent: `hash_fn((parent or NONE_HASH, tokens, extra_keys))`,
so equal hashes mean equal content and equal prefix. The cache keys a block by
its hash plus its KV cache group (`BlockHashWithGroupId`: hash bytes followed by
the group id as 4 big-endian bytes), because hybrid models cache the same
prefix once per group.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NewType, overload

from kvroute.events.hashing import HashFn, event_hash_from_bytes, sha256_cbor
from kvroute.events.kv_events import ExternalBlockHash
from kvroute.replicas.kv_cache.prompt import HashSource, has_extra_keys

if TYPE_CHECKING:
    import torch

    from kvroute.replicas.kv_cache.prompt import PromptKeys
    from kvroute.replicas.request import Request

logger = logging.getLogger(__name__)

BlockHash = NewType("BlockHash", bytes)
BlockHashWithGroupId = NewType("BlockHashWithGroupId", bytes)

GROUP_ID_BYTES = 4

# Hash of the (absent) parent of every prompt's first block; set by init_none_hash.
NONE_HASH: BlockHash = BlockHash(b"")


def init_none_hash(hash_fn: HashFn, seed: str | None = None) -> BlockHash:
    """Set NONE_HASH from `seed`, else PYTHONHASHSEED, else random bytes.

    Replicas and the router must share the seed to agree on every hash; a
    random seed makes hashes private to this process.
    """
    global NONE_HASH
    if seed is None:
        seed = os.getenv("PYTHONHASHSEED")
    if seed is None:
        if hash_fn is sha256_cbor:
            logger.warning(
                "sha256_cbor is meant for cross-process reproducible hashes, but no "
                "seed is set: set PYTHONHASHSEED or the cluster's hash_seed"
            )
        NONE_HASH = BlockHash(os.urandom(32))
    else:
        NONE_HASH = BlockHash(hash_fn(seed))
    return NONE_HASH


def make_block_hash_with_group_id(block_hash: BlockHash, group_id: int) -> BlockHashWithGroupId:
    return BlockHashWithGroupId(block_hash + group_id.to_bytes(GROUP_ID_BYTES, "big"))


def get_block_hash(key: BlockHashWithGroupId) -> BlockHash:
    return BlockHash(key[:-GROUP_ID_BYTES])


def get_group_id(key: BlockHashWithGroupId) -> int:
    return int.from_bytes(key[-GROUP_ID_BYTES:], "big")


def maybe_convert_block_hash(block_hash: BlockHash, use_int: bool = True) -> ExternalBlockHash:
    """The hash as events carry it: its low 64 bits (default) or the raw bytes.

    The choice is a parameter, not an environment lookup, because this runs once
    per cached block on the allocation hot path.
    """
    return event_hash_from_bytes(block_hash) if use_int else block_hash


def hash_block_tokens(
    hash_function: HashFn,
    parent_block_hash: BlockHash | None,
    curr_block_token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockHash:
    """Hash one block given its parent's hash (None for a prompt's first block)."""
    parent = parent_block_hash if parent_block_hash else NONE_HASH
    return BlockHash(hash_function((parent, tuple(curr_block_token_ids), extra_keys)))


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One physical block. Slotted, and threaded into the free list through
    `prev_free_block`/`next_free_block`, so queue moves allocate nothing.

    Identity equality: two blocks are the same only if they are the same object.
    """

    block_id: int
    ref_cnt: int = 0
    _block_hash: BlockHashWithGroupId | None = None
    prev_free_block: KVCacheBlock | None = None
    next_free_block: KVCacheBlock | None = None
    is_null: bool = False
    # Segmented-LRU eviction only (`segmented.py`): protected when freed.
    reused: bool = False

    @property
    def block_hash(self) -> BlockHashWithGroupId | None:
        return self._block_hash

    @block_hash.setter
    def block_hash(self, block_hash: BlockHashWithGroupId) -> None:
        if self._block_hash is not None:
            raise ValueError(f"block {self.block_id} already has a hash; reset it first")
        self._block_hash = block_hash

    def reset_hash(self) -> None:
        self._block_hash = None

    def __repr__(self) -> str:
        prev_id = self.prev_free_block.block_id if self.prev_free_block else None
        next_id = self.next_free_block.block_id if self.next_free_block else None
        return (
            f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, "
            f"block_hash={self._block_hash!r}, prev={prev_id}, next={next_id})"
        )


class FreeKVCacheBlockQueue:
    """The LRU free list: a doubly linked list between two sentinel blocks.

    Eviction takes from the head; freed blocks join at the tail, so a block that
    was used last is evicted last. `remove` is O(1), which is what lets a cache
    hit pull a free block back out of the middle of the queue.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        self.fake_free_list_head = KVCacheBlock(block_id=-1)
        self.fake_free_list_tail = KVCacheBlock(block_id=-1)
        chain = [self.fake_free_list_head, *blocks, self.fake_free_list_tail]
        for left, right in itertools.pairwise(chain):
            left.next_free_block = right
            right.prev_free_block = left

    def popleft(self) -> KVCacheBlock:
        first = self.fake_free_list_head.next_free_block
        if first is None or first is self.fake_free_list_tail:
            raise ValueError("No free blocks available")
        self._unlink(first)
        return first

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"cannot pop {n} blocks: only {self.num_free_blocks} are free")
        if n == 0:
            return []
        taken: list[KVCacheBlock] = []
        block = self.fake_free_list_head.next_free_block
        for _ in range(n):
            assert block is not None
            taken.append(block)
            nxt = block.next_free_block
            block.prev_free_block = block.next_free_block = None
            block = nxt
        assert block is not None
        self.fake_free_list_head.next_free_block = block
        block.prev_free_block = self.fake_free_list_head
        self.num_free_blocks -= n
        return taken

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free_block is None or block.next_free_block is None:
            raise RuntimeError(f"remove() called on block {block.block_id}, which is not free")
        self._unlink(block)

    def append(self, block: KVCacheBlock) -> None:
        self.append_n((block,))

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        tail = self.fake_free_list_tail
        last = tail.prev_free_block
        assert last is not None
        count = 0
        for block in blocks:
            last.next_free_block = block
            block.prev_free_block = last
            last = block
            count += 1
        last.next_free_block = tail
        tail.prev_free_block = last
        self.num_free_blocks += count

    def prepend_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Put blocks at the head, in order: they become the next to be reused."""
        head = self.fake_free_list_head
        first = head.next_free_block
        assert first is not None
        prev = head
        count = 0
        for block in blocks:
            prev.next_free_block = block
            block.prev_free_block = prev
            prev = block
            count += 1
        prev.next_free_block = first
        first.prev_free_block = prev
        self.num_free_blocks += count

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        out: list[KVCacheBlock] = []
        block = self.fake_free_list_head.next_free_block
        while block is not None and block is not self.fake_free_list_tail:
            out.append(block)
            block = block.next_free_block
        return out

    def _unlink(self, block: KVCacheBlock) -> None:
        prev_block, next_block = block.prev_free_block, block.next_free_block
        assert prev_block is not None and next_block is not None
        prev_block.next_free_block = next_block
        next_block.prev_free_block = prev_block
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1


def _mm_extra_keys(
    source: HashSource, start: int, end: int, start_mm_idx: int
) -> tuple[list[Any], int]:
    """`(identifier, offset - start)` for each multimodal item overlapping [start, end).

    Items are sorted by offset; the returned index is where the next block's scan
    starts. A negative start index counts from the last item (used when hashing
    blocks appended after the prompt).
    """
    features = source.mm_features
    keys: list[Any] = []
    if not features:
        return keys, start_mm_idx
    last = features[-1].mm_position
    if last.offset + last.length < start:
        return keys, start_mm_idx
    idx = start_mm_idx if start_mm_idx >= 0 else len(features) + start_mm_idx
    while idx < len(features):
        feature = features[idx]
        offset, length = feature.mm_position.offset, feature.mm_position.length
        if end <= offset:
            break
        if start > offset + length:
            idx += 1
            continue
        keys.append((feature.identifier, offset - start))
        if end < offset + length:
            break
        idx += 1
    return keys, idx


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes, as vLLM hashes it: viewed as uint8, which works for
    every dtype, bfloat16 included (numpy has no bfloat16). torch is imported here, not
    at the top: only prompts given as embeddings need it."""
    import torch

    return tensor.flatten().contiguous().view(torch.uint8).numpy().data


def generate_block_hash_extra_keys(
    request: HashSource, start_token_idx: int, end_token_idx: int, start_mm_idx: int
) -> tuple[tuple[Any, ...] | None, int]:
    """Extra keys of one block, in the order LoRA name, multimodal items, cache
    salt (first block only), prompt-embedding digest; None when there are none."""
    mm_keys, next_mm_idx = _mm_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx)
    keys: list[Any] = []
    if request.lora_name is not None:
        keys.append(request.lora_name)
    keys.extend(mm_keys)
    if start_token_idx == 0 and request.cache_salt:
        keys.append(request.cache_salt)
    if request.prompt_embeds is not None:
        block_embeds = request.prompt_embeds[start_token_idx:end_token_idx]
        keys.append(hashlib.sha256(_raw_bytes(block_embeds)).digest())
    return (tuple(keys) if keys else None), next_mm_idx


class RequestBlockHasher:
    """Hashes a request's full blocks that are not hashed yet.

    Called once at request creation and after each token append; returns only
    the new hashes, which the request appends to `block_hashes`. `none_hash`
    pins the chain's root explicitly (the router does, per cluster seed);
    without it the process-wide NONE_HASH is read at call time.
    """

    __slots__ = ("block_size", "hash_fn", "none_hash")

    def __init__(
        self, block_size: int, hash_fn: HashFn, none_hash: BlockHash | None = None
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.hash_fn = hash_fn
        self.none_hash = none_hash

    def computes_same_hashes_as(self, other: object) -> bool:
        """True when `other` turns every request into the same hashes as this hasher:
        same block size, same function and same chain root (an unpinned root is the
        process-wide NONE_HASH as it is now)."""
        return (
            isinstance(other, RequestBlockHasher)
            and other.block_size == self.block_size
            and other.hash_fn is self.hash_fn
            and (other.none_hash or NONE_HASH) == (self.none_hash or NONE_HASH)
        )

    def __call__(self, request: Request) -> list[BlockHash]:
        """The hashes of `request`'s full blocks beyond those it already has."""
        return self.hash_new_blocks(request, request.all_token_ids, request.block_hashes)

    def prompt_hashes(self, keys: PromptKeys) -> list[BlockHash]:
        """The hashes of every full block of a prompt."""
        return self.hash_new_blocks(keys, keys.token_ids, ())

    def hash_new_blocks(
        self, source: HashSource, token_ids: Sequence[int], done: Sequence[BlockHash]
    ) -> list[BlockHash]:
        """Hashes of the full blocks of `token_ids` after the `len(done)` already hashed,
        chained from `done[-1]` (or the root), with `source`'s extra keys. The one place
        a block hash is computed, for replicas and router alike."""
        block_size = self.block_size
        start = len(done) * block_size
        num_tokens = len(token_ids)
        if start + block_size > num_tokens:
            return []
        mm_idx = -1 if start > 0 else 0
        parent = done[-1] if done else self.none_hash
        plain = not has_extra_keys(source)
        hash_fn = self.hash_fn
        chain = getattr(hash_fn, "chain", None) if plain else None
        if chain is not None:
            # One compiled call for the whole chain; equal, block for block, to the loop.
            chained = chain(parent or NONE_HASH, token_ids, start, block_size)
            if chained is not None:
                return chained
        new_hashes: list[BlockHash] = []
        while start + block_size <= num_tokens:
            end = start + block_size
            extra_keys = None
            if not plain:
                extra_keys, mm_idx = generate_block_hash_extra_keys(source, start, end, mm_idx)
            parent = hash_block_tokens(hash_fn, parent, token_ids[start:end], extra_keys)
            new_hashes.append(parent)
            start = end
        return new_hashes


def get_request_block_hasher(block_size: int, caching_hash_fn: HashFn) -> RequestBlockHasher:
    """vLLM's name for building a `RequestBlockHasher` rooted at NONE_HASH."""
    return RequestBlockHasher(block_size, caching_hash_fn)


class BlockHashListWithBlockSize(Sequence[BlockHash]):
    """A group's view of hash-block-size hashes when its blocks are `k` times larger.

    Entry i is the concatenation of hashes i*k .. i*k+k-1, which identifies the
    larger block exactly because each small hash already chains its prefix.
    """

    def __init__(self, block_hashes: Sequence[BlockHash], hash_block_size: int, block_size: int):
        if block_size % hash_block_size:
            raise ValueError(
                f"block_size {block_size} is not a multiple of hash_block_size {hash_block_size}"
            )
        self.block_hashes = block_hashes
        self.scale = block_size // hash_block_size

    def __len__(self) -> int:
        return len(self.block_hashes) // self.scale

    def _at(self, i: int) -> BlockHash:
        k = self.scale
        return BlockHash(b"".join(self.block_hashes[i * k : (i + 1) * k]))

    @overload
    def __getitem__(self, idx: int) -> BlockHash: ...

    @overload
    def __getitem__(self, idx: slice) -> list[BlockHash]: ...

    def __getitem__(self, idx: int | slice) -> BlockHash | list[BlockHash]:
        n = len(self)
        if isinstance(idx, slice):
            return [self._at(i) for i in range(*idx.indices(n))]
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(idx)
        return self._at(idx)
