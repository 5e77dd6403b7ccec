"""Per-kind block managers: how one attention kind finds hits, allocates and frees.

Hit finding is a classmethod over a `CachedBlockLookup` (the block pool, or the
router's view of a replica's cache), so the router predicts hits with exactly
the rules a replica applies. Each `find_longest_cache_hit` returns one list per
group, with positions the kind does not need filled by the null block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

from kvroute.replicas.kv_cache.block_pool import BlockPool
from kvroute.replicas.kv_cache.specs import (
    KVCacheSpec,
    KVCacheSpecKind,
    MambaSpec,
    SlidingWindowSpec,
)
from kvroute.replicas.kv_cache.utils import BlockHash, BlockHashWithGroupId, KVCacheBlock

if TYPE_CHECKING:
    from kvroute.replicas.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class CachedBlockLookup(Protocol):
    """What hit finding needs from a cache: per-group lookup and a null block."""

    null_block: KVCacheBlock

    def get_cached_block(
        self, block_hash: BlockHash, kv_cache_group_ids: Sequence[int]
    ) -> list[KVCacheBlock] | None: ...

    def get_cached_prefix(
        self, block_hashes: Sequence[BlockHash], max_blocks: int, kv_cache_group_ids: Sequence[int]
    ) -> tuple[list[KVCacheBlock], ...]:
        """Per group, the cached blocks of `block_hashes[:max_blocks]` up to the
        first position where any group misses."""
        ...


def _trim_to_alignment(
    computed: tuple[list[KVCacheBlock], ...], block_size: int, alignment_tokens: int
) -> None:
    """Drop trailing blocks until the hit is a multiple of `alignment_tokens`."""
    if block_size == alignment_tokens:
        return
    while len(computed[0]) * block_size % alignment_tokens:
        for blocks in computed:
            blocks.pop()


class SingleTypeKVCacheManager:
    """Blocks of the requests of one KV cache group.

    `req_to_blocks[r]` is request r's block table (null blocks where the kind
    keeps nothing); `num_cached_block[r]` counts its leading blocks already
    processed by `cache_blocks`, and doubles as "r has been allocated before".
    """

    # Prefix-closed kinds (full attention) keep every block of a hit, so the
    # hybrid coordinator can trim their hit instead of searching again.
    downward_closed: ClassVar[bool] = False
    # Kinds whose hit drops the EAGLE block it peeked at. Mamba keeps only the
    # state at the hit's end and never peeks, so it must not be offered one
    # block past a candidate length.
    drops_eagle_block: ClassVar[bool] = True

    def __init__(
        self,
        kv_cache_spec: KVCacheSpec,
        block_pool: BlockPool,
        enable_caching: bool,
        kv_cache_group_id: int,
        scheduler_block_size: int,
        max_admission_blocks_per_request: int | None = None,
    ) -> None:
        self.kv_cache_spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size
        self.block_pool = block_pool
        self.enable_caching = enable_caching
        self.kv_cache_group_id = kv_cache_group_id
        self.scheduler_block_size = scheduler_block_size
        self.max_admission_blocks_per_request = max_admission_blocks_per_request
        self.req_to_blocks: defaultdict[str, list[KVCacheBlock]] = defaultdict(list)
        self.num_cached_block: dict[str, int] = {}
        self._null_block = block_pool.null_block
        # Set by the coordinator: this group matches one block past a hit and
        # drops it (EAGLE/MTP drafting needs that block's hidden states).
        self.use_eagle = False

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: CachedBlockLookup,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
    ) -> tuple[list[KVCacheBlock], ...]:
        """The longest hit of at most `max_length` tokens, a multiple of
        `alignment_tokens`, common to all `kv_cache_group_ids`."""
        raise NotImplementedError

    @classmethod
    def reachable_block_mask(
        cls,
        start_block: int,
        end_block: int,
        alignment_tokens: int,
        kv_cache_spec: KVCacheSpec,
        use_eagle: bool,
        retention_interval: int | None,
        num_prompt_tokens: int,
    ) -> list[bool] | None:
        """Which of blocks [start, end) can ever serve a hit; None means all."""
        return None

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        """Leading tokens whose KV this kind no longer needs."""
        return 0

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        """Free blocks needed to hold `num_tokens`, counting hit blocks that sit in
        the free queue (touching them takes them out of it)."""
        num_required = cdiv(num_tokens, self.block_size)
        if apply_admission_cap and self.max_admission_blocks_per_request is not None:
            num_required = min(num_required, self.max_admission_blocks_per_request)
        num_held = len(self.req_to_blocks.get(request_id, ()))
        if request_id in self.num_cached_block:
            if new_computed_blocks:
                raise ValueError(f"running request {request_id} cannot take new prefix hits")
            return max(num_required - num_held, 0)
        num_skipped_blocks = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        num_local = len(new_computed_blocks) + num_held
        num_new = max(num_required - max(num_skipped_blocks, num_local), 0)
        first_kept = max(0, num_skipped_blocks - num_held)
        evictable = sum(
            1 for b in new_computed_blocks[first_kept:] if b.ref_cnt == 0 and not b.is_null
        )
        return num_new + evictable

    def allocate_new_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        """Adopt a new request's hit blocks (skipped ones become null blocks), and
        allocate blocks for tokens a connector computed outside this cache."""
        if request_id in self.num_cached_block:
            if new_computed_blocks:
                raise ValueError(f"running request {request_id} cannot take new prefix hits")
            return
        req_blocks = self.req_to_blocks[request_id]
        if req_blocks:
            raise ValueError(f"running request {request_id} cannot take new prefix hits")
        total = num_local_computed_tokens + num_external_computed_tokens
        num_skipped_tokens = self.get_num_skipped_tokens(total)
        num_skipped_blocks = max(num_skipped_tokens, 0) // self.block_size
        if num_skipped_blocks > 0:
            new_computed_blocks = new_computed_blocks[num_skipped_blocks:]
            num_external_computed_tokens = min(
                total - num_skipped_tokens, num_external_computed_tokens
            )
        if self.enable_caching:
            self.block_pool.touch(new_computed_blocks)
        elif any(new_computed_blocks):
            raise ValueError("computed blocks must be empty when prefix caching is disabled")
        req_blocks.extend([self._null_block] * num_skipped_blocks)
        req_blocks.extend(new_computed_blocks)
        self.num_cached_block[request_id] = len(req_blocks)
        if num_external_computed_tokens > 0:
            missing = cdiv(total, self.block_size) - len(req_blocks)
            req_blocks.extend(self.block_pool.get_new_blocks(missing))

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        """Grow the block table to hold `num_tokens`; returns the new blocks."""
        req_blocks = self.req_to_blocks[request_id]
        num_new = cdiv(num_tokens, self.block_size) - len(req_blocks)
        if num_new <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new)
        req_blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(
        self, request: Request, num_tokens: int, retention_interval: int | None = None
    ) -> None:
        """Publish the request's full blocks up to `num_tokens` to the prefix cache,
        except those the kind could never hit on."""
        request_id = request.request_id
        num_cached = self.num_cached_block.get(request_id, 0)
        num_full = num_tokens // self.block_size
        if num_cached >= num_full:
            return
        mask = self.reachable_block_mask(
            num_cached,
            num_full,
            self.scheduler_block_size,
            self.kv_cache_spec,
            self.use_eagle,
            retention_interval,
            request.num_prompt_tokens,
        )
        self.block_pool.cache_full_blocks(
            request,
            self.req_to_blocks[request_id],
            num_cached,
            num_full,
            self.block_size,
            self.kv_cache_group_id,
            block_mask=mask,
        )
        self.num_cached_block[request_id] = num_full

    def remove_skipped_blocks(self, request_id: str, total_computed_tokens: int) -> None:
        """Release blocks that fell out of the attention window, replacing them
        with the null block. Uncached scratch blocks go to the front of the free
        queue (reused first); cached ones to the back (kept for hits)."""
        num_skipped_tokens = self.get_num_skipped_tokens(total_computed_tokens)
        if num_skipped_tokens <= 0:
            return
        blocks = self.req_to_blocks[request_id]
        num_skipped_blocks = min(num_skipped_tokens // self.block_size, len(blocks))
        cached: list[KVCacheBlock] = []
        scratch: list[KVCacheBlock] = []
        for i in range(num_skipped_blocks - 1, -1, -1):
            block = blocks[i]
            if block.is_null:
                break
            (scratch if block.block_hash is None else cached).append(block)
            blocks[i] = self._null_block
        self.block_pool.free_blocks(cached)
        self.block_pool.free_blocks(scratch, prepend=True)

    def free(self, request_id: str) -> None:
        """Release all blocks of a request, tail first (so the tail is evicted first)."""
        blocks = self.req_to_blocks.pop(request_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.num_cached_block.pop(request_id, None)

    def new_step_starts(self) -> None:
        """Hook for per-step state; most kinds keep none."""


class FullAttentionManager(SingleTypeKVCacheManager):
    """Full attention (and MLA): a hit needs every block of the prefix."""

    downward_closed = True

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: CachedBlockLookup,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
    ) -> tuple[list[KVCacheBlock], ...]:
        block_size = kv_cache_spec.block_size
        # Hashes chain their prefix: the first miss ends the hit.
        computed = block_pool.get_cached_prefix(
            block_hashes, max_length // block_size, kv_cache_group_ids
        )
        if drop_eagle_block and computed[0]:
            for blocks in computed:
                blocks.pop()
        _trim_to_alignment(computed, block_size, alignment_tokens)
        return computed


class SlidingWindowManager(SingleTypeKVCacheManager):
    """Sliding window: a hit at length L needs only the blocks covering the last
    `sliding_window - 1` tokens before L; earlier positions are null."""

    def __init__(self, kv_cache_spec: SlidingWindowSpec, **kwargs: object) -> None:
        super().__init__(kv_cache_spec, **kwargs)  # type: ignore[arg-type]
        self.sliding_window = kv_cache_spec.sliding_window

    @staticmethod
    def contiguous_blocks_for_hit(window: int, block_size: int, use_eagle: bool) -> int:
        """Blocks a hit needs right before its end (one more to peek for EAGLE)."""
        return cdiv(window - 1, block_size) + (1 if use_eagle else 0)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: CachedBlockLookup,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
    ) -> tuple[list[KVCacheBlock], ...]:
        assert isinstance(kv_cache_spec, SlidingWindowSpec)
        block_size = kv_cache_spec.block_size
        need = cls.contiguous_blocks_for_hit(
            kv_cache_spec.sliding_window, block_size, drop_eagle_block
        )
        max_blocks = max_length // block_size
        null = block_pool.null_block
        computed = tuple([null] * max_blocks for _ in kv_cache_group_ids)
        lookup = block_pool.get_cached_block
        run = 0
        found = False
        # Scan right to left for the rightmost run of `need` cached blocks whose
        # end (after any EAGLE drop) lands on an aligned boundary.
        for i in range(max_blocks - 1, -1, -1):
            hit = lookup(block_hashes[i], kv_cache_group_ids)
            if not hit:
                run = 0
                continue
            if run == 0 and block_size != alignment_tokens:
                end_blocks = i if drop_eagle_block else i + 1
                if end_blocks * block_size % alignment_tokens:
                    continue
            for blocks, block in zip(computed, hit, strict=True):
                blocks[i] = block
            run += 1
            if run >= need:
                for blocks in computed:
                    del blocks[i + run :]
                found = True
                break
        if not found:
            # A run reaching position 0 is a hit even if shorter than the window.
            # With EAGLE its last block is the peeked one: drop it, then align
            # (aligning first could drop a whole aligned segment too many).
            for blocks in computed:
                del blocks[run:]
            if drop_eagle_block and computed[0]:
                for blocks in computed:
                    blocks.pop()
            _trim_to_alignment(computed, block_size, alignment_tokens)
        elif drop_eagle_block:
            for blocks in computed:
                blocks.pop()
            _trim_to_alignment(computed, block_size, alignment_tokens)
        return computed

    @classmethod
    def reachable_block_mask(
        cls,
        start_block: int,
        end_block: int,
        alignment_tokens: int,
        kv_cache_spec: KVCacheSpec,
        use_eagle: bool,
        retention_interval: int | None,
        num_prompt_tokens: int,
    ) -> list[bool] | None:
        """Keep only the window tails that a hit at some reachable boundary reads.

        Boundaries are every `alignment_tokens` (dense, the default), every
        `retention_interval` tokens (sparse), or none (interval 0). With any
        retention set, the tail before the prompt's last replayable boundary
        is kept too, so replaying the same prompt still hits.
        """
        assert isinstance(kv_cache_spec, SlidingWindowSpec)
        block_size = kv_cache_spec.block_size
        need = cls.contiguous_blocks_for_hit(kv_cache_spec.sliding_window, block_size, use_eagle)
        shift = 1 if use_eagle else 0
        mask = [False] * (end_block - start_block)
        segment = alignment_tokens if retention_interval is None else retention_interval
        if segment:
            per_segment = segment // block_size
            if need >= per_segment:
                return None
            for i in range(max(start_block, shift), end_block):
                if (i - shift) % per_segment >= per_segment - need:
                    mask[i - start_block] = True
        if retention_interval is not None:
            latest = (num_prompt_tokens - 1) // alignment_tokens * alignment_tokens
            tail_end = latest // block_size + shift
            for i in range(max(start_block, tail_end - need), min(end_block, tail_end)):
                mask[i - start_block] = True
        return mask

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return max(0, num_computed_tokens - self.sliding_window + 1)

    def free(self, request_id: str) -> None:
        """Scratch blocks to the front of the free queue, cached tails to the back."""
        blocks = self.req_to_blocks.pop(request_id, [])
        cached: list[KVCacheBlock] = []
        scratch: list[KVCacheBlock] = []
        for block in reversed(blocks):
            (scratch if block.block_hash is None else cached).append(block)
        self.block_pool.free_blocks(cached)
        self.block_pool.free_blocks(scratch, prepend=True)
        self.num_cached_block.pop(request_id, None)


class MambaManager(SingleTypeKVCacheManager):
    """Mamba: a hit at length L needs only the state checkpoint at L.

    A checkpoint cached in this very step may not be written yet, so a request
    hitting it is refused allocation until the next step.
    """

    def __init__(self, kv_cache_spec: MambaSpec, **kwargs: object) -> None:
        super().__init__(kv_cache_spec, **kwargs)  # type: ignore[arg-type]
        self.mamba_cache_mode = kv_cache_spec.mamba_cache_mode
        self.num_speculative_blocks = kv_cache_spec.num_speculative_blocks
        self.cached_blocks_this_step: set[BlockHashWithGroupId] = set()
        # Align mode: index of the previous state block, released once passed.
        self.last_state_block_idx: dict[str, int] = {}
        self._allocated_block_reqs: set[str] = set()

    drops_eagle_block = False

    @property
    def _align(self) -> bool:
        return self.mamba_cache_mode == "align"

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Sequence[BlockHash],
        max_length: int,
        kv_cache_group_ids: Sequence[int],
        block_pool: CachedBlockLookup,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
    ) -> tuple[list[KVCacheBlock], ...]:
        block_size = kv_cache_spec.block_size
        computed: tuple[list[KVCacheBlock], ...] = tuple([] for _ in kv_cache_group_ids)
        lookup = block_pool.get_cached_block
        for i in range(max_length // block_size - 1, -1, -1):
            hit = lookup(block_hashes[i], kv_cache_group_ids)
            if not hit:
                continue
            if block_size != alignment_tokens and (i + 1) * block_size % alignment_tokens:
                continue
            for blocks, block in zip(computed, hit, strict=True):
                blocks.extend([block_pool.null_block] * i)
                blocks.append(block)
            break
        return computed

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return num_computed_tokens - 1

    def remove_skipped_blocks(self, request_id: str, total_computed_tokens: int) -> None:
        total_computed_tokens = max(0, total_computed_tokens - self.num_speculative_blocks)
        super().remove_skipped_blocks(request_id, total_computed_tokens)
        if not self._align:
            return
        last = self.last_state_block_idx.get(request_id)
        if last is not None and last < cdiv(total_computed_tokens, self.block_size) - 1:
            blocks = self.req_to_blocks[request_id]
            if not blocks[last].is_null:
                self.block_pool.free_blocks([blocks[last]])
                blocks[last] = self._null_block

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        if new_computed_blocks and new_computed_blocks[-1].block_hash in (
            self.cached_blocks_this_step
        ):
            # More than the pool holds: the hit must wait for the next step.
            return self.block_pool.num_gpu_blocks + 1
        if not self._align:
            return super().get_num_blocks_to_allocate(
                request_id,
                num_tokens + self.block_size * self.num_speculative_blocks,
                new_computed_blocks,
                total_computed_tokens,
                num_tokens_main_model,
                apply_admission_cap,
            )
        required = cdiv(num_tokens_main_model, self.block_size) + self.num_speculative_blocks
        num_new = required - len(new_computed_blocks) - len(self.req_to_blocks[request_id])
        if num_new > 0:
            num_new = (
                1 if request_id in self._allocated_block_reqs else 1 + self.num_speculative_blocks
            )
        evictable = sum(1 for b in new_computed_blocks if b.ref_cnt == 0 and not b.is_null)
        return max(num_new, 0) + evictable

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        if not self._align:
            return super().allocate_new_blocks(
                request_id,
                num_tokens + self.block_size * self.num_speculative_blocks,
                num_tokens_main_model,
            )
        # Align mode keeps only the state block at the end of the scheduled
        # tokens (plus speculative ones); everything before it is null.
        req_blocks = self.req_to_blocks[request_id]
        spec = self.num_speculative_blocks
        required = cdiv(num_tokens_main_model, self.block_size) + spec
        if required <= len(req_blocks):
            return []
        prev_len = len(req_blocks)
        allocated_before = request_id in self._allocated_block_reqs
        if allocated_before:
            self.last_state_block_idx[request_id] = prev_len - 1 - spec
        elif prev_len > 0:
            self.last_state_block_idx[request_id] = prev_len - 1
        num_skipped = required - spec - 1
        if prev_len < num_skipped:
            req_blocks.extend([self._null_block] * (num_skipped - prev_len))
        if allocated_before:
            # Speculative blocks move forward with the state block.
            for idx in range(prev_len - spec, min(prev_len, num_skipped)):
                req_blocks.append(req_blocks[idx])
                req_blocks[idx] = self._null_block
        req_blocks.extend(self.block_pool.get_new_blocks(required - len(req_blocks)))
        self._allocated_block_reqs.add(request_id)
        return req_blocks[prev_len:]

    def cache_blocks(
        self, request: Request, num_tokens: int, retention_interval: int | None = None
    ) -> None:
        before = self.num_cached_block.get(request.request_id, 0)
        super().cache_blocks(request, num_tokens, retention_interval)
        after = self.num_cached_block.get(request.request_id, 0)
        for block in self.req_to_blocks[request.request_id][before:after]:
            if not block.is_null and block.block_hash is not None:
                self.cached_blocks_this_step.add(block.block_hash)

    def free(self, request_id: str) -> None:
        self._allocated_block_reqs.discard(request_id)
        self.last_state_block_idx.pop(request_id, None)
        super().free(request_id)

    def new_step_starts(self) -> None:
        self.cached_blocks_this_step.clear()


MANAGER_FOR_KIND: dict[KVCacheSpecKind, type[SingleTypeKVCacheManager]] = {
    KVCacheSpecKind.FULL_ATTENTION: FullAttentionManager,
    KVCacheSpecKind.MLA_ATTENTION: FullAttentionManager,
    KVCacheSpecKind.SLIDING_WINDOW: SlidingWindowManager,
    KVCacheSpecKind.MAMBA: MambaManager,
}


def manager_class_for(spec: KVCacheSpec) -> type[SingleTypeKVCacheManager]:
    """The manager class that implements a spec's hit and allocation rules."""
    try:
        return MANAGER_FOR_KIND[spec.kind]
    except KeyError:
        raise ValueError(f"no block manager for KV cache spec kind {spec.kind.value!r}") from None
