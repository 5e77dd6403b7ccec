"""What a replica schedules: a request, its sampling limits, LoRA and multimodal inputs.

A request's `block_hashes` grow as tokens are appended: the block hasher given
at construction hashes each newly completed block once, so the cache manager
and the router always see the same chain of hashes for the same tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvroute.replicas.kv_cache.prompt import HashedPrompt, PromptKeys

if TYPE_CHECKING:
    import torch

    from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter. Its name enters every block hash; its int id enters events."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name


@dataclass(frozen=True)
class PlaceholderRange:
    """Where a multimodal item's placeholder tokens sit in the prompt."""

    offset: int
    length: int
    is_embed: Any = None


@dataclass
class MultiModalKwargsItem:
    """The processed tensors of one multimodal item (opaque to the cache)."""

    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def dummy(cls) -> MultiModalKwargsItem:
        return cls({"dummy": None})


@dataclass
class MultiModalFeatureSpec:
    """One multimodal item: its content identifier enters the hashes of the
    blocks its placeholder overlaps, with its offset relative to each block."""

    data: MultiModalKwargsItem | None
    modality: str
    identifier: str
    mm_position: PlaceholderRange


@dataclass
class SamplingParams:
    """Generation limits. Only what the engine and cache need is modelled."""

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    seed: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    all_stop_token_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        self.all_stop_token_ids.update(self.stop_token_ids)

    def update_from_generation_config(
        self, generation_config: dict[str, Any], eos_token_id: int | None = None
    ) -> None:
        """Adopt the model's EOS tokens as stop tokens (unless EOS is ignored)."""
        if self.ignore_eos:
            return
        if eos_token_id is not None:
            self.all_stop_token_ids.add(eos_token_id)
        extra = generation_config.get("eos_token_id")
        if extra is not None:
            ids = [extra] if isinstance(extra, int) else list(extra)
            self.all_stop_token_ids.update(ids)
            self.stop_token_ids.extend(i for i in ids if i not in self.stop_token_ids)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    """A prompt being served: its tokens, progress, and hash chain."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | None,
        sampling_params: SamplingParams | None,
        pooling_params: Any = None,
        *,
        eos_token_id: int | None = None,
        arrival_time: float = 0.0,
        prompt_embeds: torch.Tensor | None = None,
        mm_features: list[MultiModalFeatureSpec] | None = None,
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        block_hasher: Callable[[Request], list[BlockHash]] | None = None,
        block_hashes: list[BlockHash] | None = None,
        reuse_hint_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.sampling_params = sampling_params
        self.pooling_params = pooling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.prompt_embeds = prompt_embeds
        self.mm_features: list[MultiModalFeatureSpec] = sorted(
            mm_features or [], key=lambda f: f.mm_position.offset
        )
        self.lora_request = lora_request
        self.cache_salt = cache_salt
        self.priority = priority
        # Leading prompt tokens the router saw in earlier prompts: an eviction
        # hint, used only by segmented-LRU block pools.
        if reuse_hint_tokens < 0:
            raise ValueError(f"reuse_hint_tokens must be >= 0, got {reuse_hint_tokens}")
        self.reuse_hint_tokens = reuse_hint_tokens
        self.status = RequestStatus.WAITING
        # A prompt given only as embeddings has no token ids; like vLLM, its positions
        # count as token 0 and its blocks are told apart by the embeddings' digest.
        if prompt_token_ids is None:
            if prompt_embeds is None:
                raise ValueError("a request needs prompt_token_ids or prompt_embeds")
            self.prompt_token_ids: list[int] | None = None
            self.num_prompt_tokens = len(prompt_embeds)
        else:
            self.prompt_token_ids = list(prompt_token_ids)
            self.num_prompt_tokens = len(self.prompt_token_ids)
        self._output_token_ids: list[int] = []
        self._all_token_ids: list[int] = (
            list(self.prompt_token_ids)
            if self.prompt_token_ids is not None
            else [0] * self.num_prompt_tokens
        )
        self.spec_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # `block_hashes`, when given, are the prompt's hashes computed elsewhere
        # with the same hasher: the router's, reused by the replica and the simulator.
        self.block_hashes: list[BlockHash] = list(block_hashes or ())
        self._block_hasher = block_hasher
        if block_hasher is not None:
            self.block_hashes.extend(block_hasher(self))

    @property
    def hash_block_size(self) -> int | None:
        """Tokens per entry of `block_hashes`, when the hasher says (ours do)."""
        return getattr(self._block_hasher, "block_size", None)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self._all_token_ids) + len(self.spec_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt plus output tokens. Read-only by convention: append through
        `append_output_token_ids` so the hash chain stays in step."""
        return self._all_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self._output_token_ids

    @property
    def lora_name(self) -> str | None:
        """The LoRA adapter's name, which enters every block hash."""
        return self.lora_request.lora_name if self.lora_request is not None else None

    @property
    def prompt_keys(self) -> PromptKeys:
        """What a prefill of this request hashes: its tokens so far and its extra keys."""
        return PromptKeys(
            tuple(self._all_token_ids),
            lora_name=self.lora_name,
            cache_salt=self.cache_salt,
            mm_features=tuple(self.mm_features),
            prompt_embeds=self.prompt_embeds,
            skip_prefix_cache=self.wants_prompt_logprobs,
        )

    def hashed_prompt(self, hasher: RequestBlockHasher) -> HashedPrompt:
        """The request's keys with their hashes: its own when `hasher` computes the
        same ones (no second hashing), else hashed by `hasher`."""
        if hasher.computes_same_hashes_as(self._block_hasher):
            return HashedPrompt(
                self, hasher, self.block_hashes, self.num_tokens, self.wants_prompt_logprobs
            )
        return self.prompt_keys.hashed_prompt(hasher)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params is not None and self.sampling_params.prompt_logprobs is not None

    def append_output_token_ids(self, token_ids: int | Sequence[int]) -> None:
        if isinstance(token_ids, int):
            self._output_token_ids.append(token_ids)
            self._all_token_ids.append(token_ids)
        else:
            self._output_token_ids.extend(token_ids)
            self._all_token_ids.extend(token_ids)
        if self._block_hasher is not None:
            self.block_hashes.extend(self._block_hasher(self))

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
