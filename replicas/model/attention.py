"""Attention over paged KV memory, and the dense reference it must equal.

Per step and KV cache group, `build_metadata` turns block tables into
- a slot mapping: where each new token's K/V is written (block id x block
  size + offset), so prefill writes only the new tokens;
- for each prefill chunk, the slots of its cached prefix that it reads: from
  the first position its window needs (the sliding-window manager has replaced
  earlier blocks with the null block) to its first new token; every one holds
  a written token, so nothing stale or poisoned is gathered;
- for decode-like requests (one new token), one padded key view: slots
  outside [first needed position, context length) are masked and zeroed on
  gather, so stale or poisoned memory in a partly filled block never reaches a
  result.

A prefill chunk attends to its prefix from the cache and to its own K/V as
computed this step, rounded to the cache's dtype (exactly what a later read of
the cache returns, so caching never changes a result). It takes the cheapest
exact form (see `PagedAttention`): PyTorch's causal fast path where the
attention is plainly causal, a log-sum-exp merge of prefix and causal parts
after a cached prefix, and query blocks over the band for sliding windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvroute.replicas.model.config import ModelArch
from kvroute.replicas.model.kv_memory import PagedKVMemory


@dataclass(frozen=True)
class SeqSpan:
    """One request in a step: `num_new` tokens at flat index `start`, after
    `num_computed` tokens whose K/V are already in its blocks."""

    start: int
    num_computed: int
    num_new: int
    block_ids: Sequence[int]


@dataclass(frozen=True)
class KeyView:
    """Keys of queries: flat slots [B, K] to gather, and which each query may
    attend to: mask [B, Q, K] (False for padding and out-of-window slots)."""

    slots: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class PrefillChunk:
    """`num_new` queries at flat index `start`; they read `prefix_slots`, the
    cached K/V of positions [num_computed - len(prefix_slots), num_computed)."""

    start: int
    num_new: int
    prefix_slots: torch.Tensor

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.num_new)


@dataclass(frozen=True)
class GroupMetadata:
    slot_mapping: torch.Tensor  # [T]
    window: int | None
    prefills: list[PrefillChunk]
    decode_index: torch.Tensor | None  # [B] flat indices of one-token requests
    decode_keys: KeyView | None


def build_metadata(
    spans: Sequence[SeqSpan], block_size: int, window: int | None, device: torch.device
) -> GroupMetadata:
    """Slot mapping and key views of one group for the spans of a step."""
    slot_parts = []
    for span in spans:
        pos = np.arange(span.num_computed, span.num_computed + span.num_new)
        table = np.asarray(span.block_ids, dtype=np.int64)
        slot_parts.append(table[pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.from_numpy(np.concatenate(slot_parts)).to(device)
    decodes = [s for s in spans if s.num_new == 1]
    prefills = [_prefill(s, block_size, window, device) for s in spans if s.num_new > 1]
    if not decodes:
        return GroupMetadata(slot_mapping, window, prefills, None, None)
    index = torch.tensor([s.start for s in decodes], dtype=torch.long, device=device)
    keys = _keys(decodes, block_size, window, device)
    return GroupMetadata(slot_mapping, window, prefills, index, keys)


def _prefill(
    span: SeqSpan, block_size: int, window: int | None, device: torch.device
) -> PrefillChunk:
    """The chunk and the slots of the prefix its first query needs (its last
    `window - 1` tokens, or all of them)."""
    first = 0 if window is None else max(span.num_computed - window + 1, 0)
    pos = np.arange(first, span.num_computed)
    table = np.asarray(span.block_ids, dtype=np.int64)
    slots = torch.from_numpy(table[pos // block_size] * block_size + pos % block_size)
    return PrefillChunk(span.start, span.num_new, slots.to(device))


def _keys(
    spans: Sequence[SeqSpan], block_size: int, window: int | None, device: torch.device
) -> KeyView:
    """Key view of spans that all have the same number of new tokens (padded to
    the longest context)."""
    num_q = spans[0].num_new
    computed = np.array([s.num_computed for s in spans], dtype=np.int64)
    length = computed + num_q
    first = np.maximum(computed - window + 1, 0) if window is not None else np.zeros_like(computed)
    first_block = first // block_size
    num_blocks = -(-length // block_size) - first_block
    width = int(num_blocks.max())
    blocks = np.zeros((len(spans), width), dtype=np.int64)  # padding reads block 0, masked
    for i, span in enumerate(spans):
        b0 = first_block[i]
        blocks[i, : num_blocks[i]] = span.block_ids[b0 : b0 + num_blocks[i]]
    offsets = np.arange(block_size)
    slots = (blocks[:, :, None] * block_size + offsets).reshape(len(spans), -1)
    key_pos = (first_block * block_size)[:, None] + np.arange(width * block_size)
    valid = (key_pos >= first[:, None]) & (key_pos < length[:, None])
    query_pos = computed[:, None] + np.arange(num_q)  # [B, Q]
    mask = valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])
    if window is not None:
        mask &= key_pos[:, None, :] > query_pos[:, :, None] - window
    return KeyView(
        torch.from_numpy(slots).to(device),
        torch.from_numpy(valid).to(device),
        torch.from_numpy(mask).to(device),
    )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Q, H, d], k/v [B, K, KVH, d], mask [B, Q, K] -> [B, Q, H, d]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.unsqueeze(1),
        enable_gqa=True,
    )
    return out.transpose(1, 2)


# Query rows per block when a sliding window splits a chunk's attention.
_WINDOW_QUERY_BLOCK = 128


class PagedAttention:
    """The serving `Attend`: write this step's K/V into their slots, then attend.

    A prefill chunk of n queries after p cached keys takes the cheapest exact
    form: with full attention, p = 0 is PyTorch's causal fast path (`is_causal`,
    no mask), and p > 0 merges attention over the prefix (no mask) with the
    causal part by their log-sum-exps (CPU; elsewhere one masked call); with a
    sliding window, n + p <= window is the same, and longer chunks attend in query
    blocks over each block's band with a small mask. Decodes attend in one
    padded, masked batch."""

    def __init__(self, arch: ModelArch, memory: PagedKVMemory, groups: list[GroupMetadata]) -> None:
        self.arch = arch
        self.memory = memory
        self.groups = groups
        # Per group, the decode slots to gather (invalid ones read the zero page:
        # a masked weight of 0 times a stale NaN would still be NaN) and keys.
        self.decodes = [
            None
            if g.decode_keys is None
            else (
                torch.where(g.decode_keys.valid, g.decode_keys.slots, memory.zero_slot).flatten(),
                g.decode_keys,
            )
            for g in groups
        ]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        group = self.arch.layer_group(layer)
        meta = self.groups[group]
        k_cache, v_cache = self.memory.layer(layer)
        k_stored, v_stored = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache.index_copy_(0, meta.slot_mapping, k_stored)
        v_cache.index_copy_(0, meta.slot_mapping, v_stored)
        decodes = self.decodes[group]
        if not meta.prefills and decodes is not None:  # every token decodes
            return self._decode(q, k_cache, v_cache, *decodes)
        # What a read of the cache returns for this step's tokens.
        k_new, v_new = k_stored.to(q.dtype), v_stored.to(q.dtype)
        parts = []
        for chunk in meta.prefills:
            span = chunk.span
            k_pre = k_cache[chunk.prefix_slots].to(q.dtype)
            v_pre = v_cache[chunk.prefix_slots].to(q.dtype)
            attended = attend_chunk(q[span], k_pre, v_pre, k_new[span], v_new[span], meta.window)
            if chunk.num_new == q.shape[0]:  # the step is this one chunk
                return attended
            parts.append((span, attended))
        out = torch.empty_like(q)
        for span, attended in parts:
            out[span] = attended
        if decodes is not None and meta.decode_index is not None:
            out[meta.decode_index] = self._decode(q[meta.decode_index], k_cache, v_cache, *decodes)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        keys: KeyView,
    ) -> torch.Tensor:
        """One query per sequence [B, H, d] over the padded key view. The heads
        sharing a KV head attend as that head's queries (head h reads KV head
        h // group, as GQA does), over K/V gathered straight into SDPA's
        contiguous [B, KV heads, keys, d] layout in the query's dtype."""
        batch, width = keys.slots.shape
        kv_heads, head_dim = k_cache.shape[1:]

        def gather(cache: torch.Tensor) -> torch.Tensor:
            rows = cache.index_select(0, slots).view(batch, width, kv_heads, head_dim)
            out = torch.empty((batch, kv_heads, width, head_dim), dtype=q.dtype, device=q.device)
            return out.copy_(rows.transpose(1, 2))

        grouped = q.reshape(batch, kv_heads, -1, head_dim)
        out = F.scaled_dot_product_attention(
            grouped, gather(k_cache), gather(v_cache), attn_mask=keys.mask.unsqueeze(1)
        )
        return out.reshape(q.shape)


def attend_chunk(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    window: int | None,
    merge_on_cpu: bool = True,
) -> torch.Tensor:
    """Attention of a chunk's n queries q [n, H, d] (positions p..p+n-1) over the
    p' <= p prefix keys it needs [p', KVH, d] and its own n keys, causal and
    windowed: [n, H, d]. `merge_on_cpu` False forces the masked form (tests)."""
    n, p = q.shape[0], k_prefix.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, d]
    k_all = torch.cat([k_prefix, k_new]).transpose(0, 1).unsqueeze(0)
    v_all = torch.cat([v_prefix, v_new]).transpose(0, 1).unsqueeze(0)
    if window is not None and n + p > window:
        return _windowed(qh, k_all, v_all, p, window)[0].transpose(0, 1)
    if p == 0:
        out = F.scaled_dot_product_attention(qh, k_all, v_all, is_causal=True, enable_gqa=True)
    elif merge_on_cpu and q.device.type == "cpu":
        out = _merged(qh, k_all, v_all, p)
    else:
        key_pos = torch.arange(p + n, device=q.device)
        mask = key_pos[None, :] <= (p + torch.arange(n, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(qh, k_all, v_all, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def _merged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
    """Softmax over [prefix, causal block] from the two parts' outputs and
    log-sum-exps (CPU flash attention returns both): each part is weighted by
    its share exp(lse_part - lse_all) of the whole softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out_pre, lse_pre = flash(q, k[:, :, :p], v[:, :, :p], 0.0, False)
    out_new, lse_new = flash(q, k[:, :, p:], v[:, :, p:], 0.0, True)
    lse = torch.logaddexp(lse_pre, lse_new)
    weight_pre = (lse_pre - lse).exp().unsqueeze(-1)
    weight_new = (lse_new - lse).exp().unsqueeze(-1)
    return (out_pre * weight_pre + out_new * weight_new).to(q.dtype)  # lse is float32


def _windowed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int, window: int
) -> torch.Tensor:
    """Sliding-window attention in query blocks: a block reads only the keys
    its band spans (at most block + window - 1), so the work is n x (block +
    window) instead of n x (p + n). Query i sits at key index p + i."""
    n = q.shape[2]
    out = torch.empty_like(q)
    device = q.device
    for a in range(0, n, _WINDOW_QUERY_BLOCK):
        b = min(a + _WINDOW_QUERY_BLOCK, n)
        lo = max(p + a - window + 1, 0)
        key_pos = torch.arange(lo, p + b, device=device)[None, :]
        query_pos = torch.arange(p + a, p + b, device=device)[:, None]
        mask = (key_pos <= query_pos) & (key_pos > query_pos - window)
        out[:, :, a:b] = F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, lo : p + b], v[:, :, lo : p + b], attn_mask=mask, enable_gqa=True
        )
    return out


class DenseAttention:
    """The reference `Attend` for one whole sequence (positions 0..T-1): plain
    attention with a causal and, per layer, sliding-window mask; no cache.
    With `kv_dtype`, K/V are rounded to it first, as a cache of that dtype
    stores them (paged attention then equals this to float rounding)."""

    def __init__(
        self,
        arch: ModelArch,
        length: int,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.arch = arch
        self.kv_dtype = kv_dtype
        pos = torch.arange(length, device=device)
        self.causal = pos[None, :] <= pos[:, None]
        self.in_window = {
            w: self.causal & (pos[None, :] > pos[:, None] - w)
            for w in set(arch.group_windows)
            if w is not None
        }

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        window = self.arch.layer_window(layer)
        mask = self.causal if window is None else self.in_window[window]
        if self.kv_dtype is not None:
            k, v = k.to(self.kv_dtype).to(q.dtype), v.to(self.kv_dtype).to(q.dtype)
        return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0))[0]
