"""The K/V tensors behind the block manager's block ids.

Layout (vLLM's hybrid allocator): all groups draw block ids from one pool and
a block id belongs to one group at a time, so layer j of every group can share
one K and one V tensor of `num_blocks x block_size x kv_heads x head_dim` in
the groups' dtype. Memory is therefore num_blocks x page size x layers of the
largest group, and a memory budget sizes `num_blocks` by that.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec
import torch

from kvroute.replicas.config import ModelConfig, ReplicasConfig
from kvroute.replicas.kv_cache.specs import AttentionSpec, KVCacheTensor
from kvroute.replicas.model.config import ModelArch, attention_specs, model_arch, tokenizer_file
from kvroute.replicas.model.weights import check_checkpoint


def resolve_model(model: ModelConfig, replicas: ReplicasConfig) -> ModelConfig:
    """The model section as every replica builds it, so that the router's config
    agrees: checked for the torch executor (a group it cannot compute, or a
    checkpoint whose weights or tokenizer do not fit, is an error before any
    replica starts), `num_blocks` sized from `replicas.kv_cache_memory` if set."""
    budget = replicas.kv_cache_bytes()
    if replicas.executor == "simulated" and budget is None:
        tokenizer_file(model.tokenizer, model.path)
        return model
    arch = model_arch(model)
    if model.path is not None:
        check_checkpoint(Path(model.path), arch)
    tokenizer_file(model.tokenizer, model.path)
    if budget is None:
        return model
    num_blocks = num_blocks_for_budget(budget, attention_specs(model)[0], arch)
    return msgspec.structs.replace(model, num_blocks=num_blocks)


def num_blocks_for_budget(budget_bytes: int, spec: AttentionSpec, arch: ModelArch) -> int:
    """How many blocks fit in `budget_bytes` of K/V memory (the null block included)."""
    per_block = spec.page_size_bytes * arch.layers_per_group
    num_blocks = budget_bytes // per_block
    if num_blocks < 2:
        raise ValueError(
            f"replicas.kv_cache_memory {budget_bytes} B holds {num_blocks} blocks of "
            f"{per_block} B; at least 2 are needed"
        )
    return num_blocks


def kv_cache_tensors(spec: AttentionSpec, arch: ModelArch, num_blocks: int) -> list[KVCacheTensor]:
    """The config's description of the shared tensors: which layers share each."""
    return [
        KVCacheTensor(
            size=num_blocks * spec.page_size_bytes,
            shared_by=layer_names(arch, slot),
        )
        for slot in range(arch.layers_per_group)
    ]


def layer_names(arch: ModelArch, slot: int) -> list[str]:
    """Layers that use shared tensor `slot`: the slot-th layer of each group."""
    groups = len(arch.group_windows)
    layers = range(slot * groups, min((slot + 1) * groups, arch.num_layers))
    return [f"model.layers.{i}" for i in layers]


class PagedKVMemory:
    """K and V pages for every layer, indexed by the block manager's block ids.

    One page past the pool (block id `num_blocks`, which the block manager never
    hands out, never written nor poisoned) stays zero: padded key views read it
    instead of masking gathered K/V, since a masked NaN still poisons softmax."""

    def __init__(
        self, spec: AttentionSpec, arch: ModelArch, num_blocks: int, device: torch.device
    ) -> None:
        self.block_size = spec.block_size
        self.num_groups = len(arch.group_windows)
        self.zero_slot = num_blocks * spec.block_size
        shape = (num_blocks + 1, spec.block_size, spec.num_kv_heads, spec.head_size)
        self.k = [
            torch.zeros(shape, dtype=spec.dtype, device=device)
            for _ in range(arch.layers_per_group)
        ]
        self.v = [torch.zeros_like(k) for k in self.k]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of a layer, flattened to [num_blocks * block_size, kv_heads, head_dim]."""
        slot = layer // self.num_groups
        return self.k[slot].flatten(0, 1), self.v[slot].flatten(0, 1)

    def poison(self, block_ids: Iterable[int]) -> None:
        """Fill blocks with NaN (debug): any later read of them shows in the output."""
        ids = torch.tensor(list(block_ids), dtype=torch.long, device=self.k[0].device)
        if ids.numel() == 0:
            return
        for tensor in [*self.k, *self.v]:
            tensor.index_fill_(0, ids, float("nan"))
