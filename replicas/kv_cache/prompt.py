"""Prompt keys: what a prompt's block hashes depend on, and nothing else.

The router hashes prompts; it must not need the replica's scheduler `Request` to
do so. `PromptKeys` carries the tokens and every extra key that enters a block
hash (LoRA name, cache salt, multimodal placements, prompt embeddings), and
`HashedPrompt` pairs keys with their hashes and the hasher that made them, so a
hash chain is computed once and reused wherever the same function, seed and
block size apply. `RequestBlockHasher.hash_new_blocks` is the one function that
turns either a `Request` or `PromptKeys` into block hashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from kvroute.replicas.kv_cache.utils import BlockHash, RequestBlockHasher


class Placement(Protocol):
    offset: int
    length: int


class MultiModalItem(Protocol):
    """A multimodal item as hashing sees it: a content id and where it sits."""

    identifier: str
    mm_position: Placement


class HashSource(Protocol):
    """The extra keys of a prompt's blocks; `Request` and `PromptKeys` both have them."""

    @property
    def lora_name(self) -> str | None: ...

    @property
    def cache_salt(self) -> str | None: ...

    @property
    def mm_features(self) -> Sequence[MultiModalItem]: ...

    @property
    def prompt_embeds(self) -> Any: ...


def has_extra_keys(source: HashSource) -> bool:
    """True when some block of `source` hashes more than its tokens."""
    return bool(
        source.lora_name
        or source.mm_features
        or source.cache_salt
        or source.prompt_embeds is not None
    )


@dataclass(frozen=True, eq=False, slots=True)
class PromptKeys:
    """A prompt as block hashing sees it.

    `skip_prefix_cache` marks a prompt whose prefill reads no cached block (vLLM
    skips the cache for prompt logprobs), so every replica's hit is 0.
    """

    token_ids: tuple[int, ...]
    lora_name: str | None = None
    cache_salt: str | None = None
    mm_features: tuple[MultiModalItem, ...] = ()
    prompt_embeds: Any = None
    skip_prefix_cache: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_keys(self) -> PromptKeys:
        return self

    def hashed_prompt(self, hasher: RequestBlockHasher) -> HashedPrompt:
        hashes = tuple(hasher.prompt_hashes(self))
        return HashedPrompt(self, hasher, hashes, self.num_tokens, self.skip_prefix_cache)


class PromptSource(Protocol):
    """Anything the router can hash: `PromptKeys`, `HashedPrompt`, or a `Request`."""

    @property
    def prompt_keys(self) -> PromptKeys: ...

    def hashed_prompt(self, hasher: RequestBlockHasher) -> HashedPrompt: ...


class HashedPrompt(NamedTuple):
    """A prompt's full blocks' hashes, made by `hasher`, with what predicting a hit
    needs. `source` gives the keys only when they are asked for: a `Request` that
    already holds its hashes is never copied into keys on the routing path (its
    own hash list is shared, so use a HashedPrompt before the request grows).
    A NamedTuple: one is built per routed prompt, and its C constructor is cheap."""

    source: PromptSource
    hasher: RequestBlockHasher
    block_hashes: Sequence[BlockHash]
    num_tokens: int
    skip_prefix_cache: bool = False

    @property
    def keys(self) -> PromptKeys:
        return self.source.prompt_keys

    @property
    def prompt_keys(self) -> PromptKeys:
        return self.source.prompt_keys

    def hashed_prompt(self, hasher: RequestBlockHasher) -> HashedPrompt:
        """These hashes if `hasher` computes the same ones, else the prompt hashed anew."""
        if hasher.computes_same_hashes_as(self.hasher):
            return self
        return self.source.hashed_prompt(hasher)
