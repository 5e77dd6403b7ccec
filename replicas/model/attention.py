"""Attention over paged KV memory, and the dense reference it must equal.

Per step and KV cache group, `build_metadata` turns block tables into
- a slot mapping: where each new token's K/V is written (block id x block
  size + offset), so prefill writes only the new tokens;
- key views: which slots each query reads. A request reads from the first
  block its window needs (the sliding-window manager has replaced earlier
  blocks with the null block), up to its last new token. Slots outside
  [first needed position, context length) are masked and zeroed on gather, so
  stale or poisoned memory in a partly filled block never reaches a result.

Decode-like requests (one new token) are attended in one padded batch; longer
prefill chunks one by one.
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
class GroupMetadata:
    slot_mapping: torch.Tensor  # [T]
    prefills: list[tuple[int, int, KeyView]]  # (start, num_new, keys with B = 1)
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
    prefills = [
        (s.start, s.num_new, _keys([s], block_size, window, device)) for s in spans if s.num_new > 1
    ]
    if not decodes:
        return GroupMetadata(slot_mapping, prefills, None, None)
    index = torch.tensor([s.start for s in decodes], dtype=torch.long, device=device)
    return GroupMetadata(slot_mapping, prefills, index, _keys(decodes, block_size, window, device))


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


class PagedAttention:
    """The serving `Attend`: write this step's K/V into their slots, then attend
    through each group's key views."""

    def __init__(self, arch: ModelArch, memory: PagedKVMemory, groups: list[GroupMetadata]) -> None:
        self.arch = arch
        self.memory = memory
        self.groups = groups

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        meta = self.groups[self.arch.layer_group(layer)]
        k_cache, v_cache = self.memory.layer(layer)
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        for start, num_new, keys in meta.prefills:
            span = slice(start, start + num_new)
            k_seq, v_seq = self._gather(k_cache, v_cache, keys, q)
            out[span] = _sdpa(q[span].unsqueeze(0), k_seq, v_seq, keys.mask)[0]
        if meta.decode_index is not None and meta.decode_keys is not None:
            keys = meta.decode_keys
            k_dec, v_dec = self._gather(k_cache, v_cache, keys, q)
            out[meta.decode_index] = _sdpa(
                q[meta.decode_index].unsqueeze(1), k_dec, v_dec, keys.mask
            )[:, 0]
        return out

    @staticmethod
    def _gather(
        k_cache: torch.Tensor, v_cache: torch.Tensor, keys: KeyView, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [B, K, KVH, d] of the view's slots, zero where not valid: a masked
        weight of 0 times NaN would still be NaN, so invalid slots are cleared."""
        valid = keys.valid[..., None, None]
        k = torch.where(valid, k_cache[keys.slots].to(like.dtype), 0.0)
        v = torch.where(valid, v_cache[keys.slots].to(like.dtype), 0.0)
        return k, v


class DenseAttention:
    """The reference `Attend` for one whole sequence (positions 0..T-1): plain
    attention with a causal and, per layer, sliding-window mask; no cache."""

    def __init__(self, arch: ModelArch, length: int, device: torch.device) -> None:
        self.arch = arch
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
        return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0))[0]
