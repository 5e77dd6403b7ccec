"""The torch executor: a real model computing over the block manager's KV memory.

Each step it reads every scheduled request's block table from the cache
manager (one per KV cache group), builds slot mappings and key views, runs the
whole batch through the model once (prefill chunks and decodes together) and
samples one token per request that reached the end of its known tokens. The
duration it reports is the wall time that took.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvroute.replicas.config import ModelConfig
from kvroute.replicas.executor import ScheduledRequest, StepOutput, StepShape
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.model.attention import PagedAttention, SeqSpan, build_metadata
from kvroute.replicas.model.config import attention_specs
from kvroute.replicas.model.kv_memory import PagedKVMemory
from kvroute.replicas.model.sampling import Sampler
from kvroute.replicas.model.weights import LoadedModel
from kvroute.replicas.request import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA when present, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchExecutor:
    measures_time = True

    def __init__(
        self,
        loaded: LoadedModel,
        model_config: ModelConfig,
        kv_cache: KVCacheManager,
        device: torch.device,
        seed: int = 0,
        poison_free_blocks: bool = False,
    ) -> None:
        self.model = loaded.model
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.kv_cache = kv_cache
        self.device = device
        self.spec = attention_specs(model_config)[0]
        self.memory = PagedKVMemory(
            self.spec, self.arch, kv_cache.kv_cache_config.num_blocks, device
        )
        self.sampler = Sampler(seed)
        self.poison_free_blocks = poison_free_blocks

    def execute(self, batch: Sequence[ScheduledRequest], shape: StepShape) -> StepOutput:
        started = time.perf_counter()
        if not batch:
            return StepOutput(0.0, {})
        if self.poison_free_blocks:
            self._poison()
        # Sampling runs on the CPU, where each request's generator lives.
        logits = self.forward(batch).cpu()
        sampled = [
            (s.request.request_id, s.request.sampling_params or _GREEDY) for s in batch if s.sample
        ]
        tokens, failed = self.sampler.sample_rows(sampled, logits)
        return StepOutput(time.perf_counter() - started, tokens, failed)

    @torch.inference_mode()
    def forward(self, batch: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Logits [requests with `sample`, vocab] of one step, writing its K/V."""
        ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        spans: list[list[SeqSpan]] = [[] for _ in self.arch.group_windows]
        for s in batch:
            req, start = s.request, len(ids)
            ids.extend(req.all_token_ids[s.num_computed : s.num_computed + s.num_new])
            positions.extend(range(s.num_computed, s.num_computed + s.num_new))
            if s.sample:
                logits_indices.append(len(ids) - 1)
            for group, block_ids in enumerate(self.kv_cache.get_block_ids(req.request_id)):
                spans[group].append(SeqSpan(start, s.num_computed, s.num_new, block_ids))
        device = self.device
        metadata = [
            build_metadata(group_spans, self.spec.block_size, window, device)
            for group_spans, window in zip(spans, self.arch.group_windows, strict=True)
        ]
        return self.model(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            PagedAttention(self.arch, self.memory, metadata),
            torch.tensor(logits_indices, dtype=torch.long, device=device),
        )

    def _poison(self) -> None:
        """NaN into every block no request may read: free and holding no cached prefix."""
        self.memory.poison(
            b.block_id
            for b in self.kv_cache.block_pool.blocks
            if b.is_null or (b.ref_cnt == 0 and b.block_hash is None)
        )

    def forget(self, request_id: str) -> None:
        self.sampler.forget(request_id)
