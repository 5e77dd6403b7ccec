"""A replica's public interface: what the router sends, what it gets back.

Plain msgspec structs, so they cross Ray calls cheaply and the router never
needs the actor's internals. `validate_generate` is the one definition of a
valid request, used by the router (to answer 400 before routing) and by the
engine (to refuse anything that slipped through).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Protocol

import msgspec

from kvroute.events.kv_events import KVEventBatch
from kvroute.events.load import ReplicaLoad as ReplicaLoad  # the wire format owns it
from kvroute.replicas.kv_cache.specs import KVCacheConfig
from kvroute.replicas.request import LoRARequest


class InvalidRequestError(ValueError):
    """A request that cannot be served; the message names the problem, and `param`
    the request field at fault when there is one (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestAbortedError(RuntimeError):
    """The request was aborted before it finished (its client left or timed out)."""


class RequestFailedError(RuntimeError):
    """The engine failed while serving this one request (a fault it could pin on
    it); the request's blocks are freed and the engine goes on serving the rest.
    The message names the request id and nothing internal: the cause is logged
    by the replica."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} failed in the engine")
        self.request_id = request_id


class EngineDeadError(RuntimeError):
    """The replica's engine loop has stopped: it serves nothing until restarted."""


# Every seed the engine uses (choice j of a request samples with seed + j) is a
# 64-bit signed integer, the range vLLM's OpenAI server takes; torch's generator
# takes all of it (it refuses anything below -2**63 or above 2**64 - 1).
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
# Temperature is OpenAI's and vLLM's [0, 2]; vLLM raises any positive value below
# MIN_TEMPERATURE to it, since dividing logits by less overflows to inf and NaN.
MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 0.01


class ModelLimits(msgspec.Struct, frozen=True):
    max_model_len: int
    vocab_size: int
    lora_names: tuple[str, ...] = ()


class SamplingLike(Protocol):
    """The sampling fields the engine uses: `SamplingOptions` on the wire,
    `request.SamplingParams` in the engine."""

    @property
    def temperature(self) -> float: ...

    @property
    def top_p(self) -> float: ...

    @property
    def top_k(self) -> int: ...

    @property
    def seed(self) -> int | None: ...

    @property
    def stop_token_ids(self) -> Sequence[int]: ...


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def validate_sampling(sampling: SamplingLike, vocab_size: int) -> None:
    """Raise `InvalidRequestError` naming the first sampling field the engine could
    not use. Ray callers reach the engine without the HTTP door, so the engine
    checks every field itself (the door's checks are the same, by field name)."""
    temperature = sampling.temperature
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequestError(
            f"temperature must be a number in [0, {MAX_TEMPERATURE:g}]", "temperature"
        )
    top_p = sampling.top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InvalidRequestError("top_p must be a number in (0, 1]", "top_p")
    if type(sampling.top_k) is not int or sampling.top_k < 0:
        raise InvalidRequestError("top_k must be 0 (off) or a positive integer", "top_k")
    seed = sampling.seed
    if seed is not None and (type(seed) is not int or not SEED_MIN <= seed <= SEED_MAX):
        raise InvalidRequestError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]", "seed")
    stop_ids = sampling.stop_token_ids
    if stop_ids and (
        not all(type(t) is int for t in stop_ids)
        or min(stop_ids) < 0
        or max(stop_ids) >= vocab_size
    ):
        raise InvalidRequestError(
            f"stop_token_ids must be token ids in the vocabulary [0, {vocab_size})",
            "stop_token_ids",
        )


def validate_generate(
    prompt_token_ids: Sequence[int],
    max_tokens: int | None,
    lora_name: str | None,
    limits: ModelLimits,
    sampling: SamplingLike | None = None,
    token_bounds: tuple[int, int] | None = None,
) -> None:
    """Raise `InvalidRequestError` naming what is wrong with a request (its
    sampling too, when given). `token_bounds` are the prompt's lowest and highest
    token ids when the caller has them already (the router reads them off the
    uint32 array it hashes), so the prompt is not scanned again."""
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty", "prompt")
    if len(prompt_token_ids) >= limits.max_model_len:
        raise InvalidRequestError(
            f"prompt has {len(prompt_token_ids)} tokens; max_model_len is "
            f"{limits.max_model_len} and at least one token must be generated",
            "prompt",
        )
    vocab = limits.vocab_size
    # min/max run in C: a per-token Python check costs ~1.7 ms per 12k-token prompt.
    low, high = token_bounds or (min(prompt_token_ids), max(prompt_token_ids))
    if low < 0 or high >= vocab:
        bad = next(t for t in prompt_token_ids if not 0 <= t < vocab)
        raise InvalidRequestError(
            f"token id {bad!r} is outside the vocabulary [0, {vocab})", "prompt"
        )
    if lora_name is not None and lora_name not in limits.lora_names:
        raise InvalidRequestError(f"unknown LoRA adapter {lora_name!r}", "model")
    if type(max_tokens) is not int or max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
    if len(prompt_token_ids) + max_tokens > limits.max_model_len:
        raise InvalidRequestError(
            f"the prompt's {len(prompt_token_ids)} tokens plus max_tokens {max_tokens} exceed "
            f"the model's context of {limits.max_model_len} tokens",
            "max_tokens",
        )
    if sampling is not None:
        validate_sampling(sampling, limits.vocab_size)


def lora_request_for(name: str | None, lora_names: Sequence[str]) -> LoRARequest | None:
    """The adapter for `name`; ids are 1-based positions in the configured list,
    so every replica and the router agree on them."""
    if name is None:
        return None
    if name not in lora_names:
        raise InvalidRequestError(f"unknown LoRA adapter {name!r}")
    return LoRARequest(name, list(lora_names).index(name) + 1)


class SamplingOptions(msgspec.Struct, frozen=True):
    """How a replica picks each output token (OpenAI's parameters of that name).

    temperature 0 is greedy; top_p 1 and top_k 0 are off; a `seed` gives the request
    its own generator, so the same request gives the same tokens however it is
    batched. Generation stops at `stop_token_ids` and, unless `ignore_eos`, at EOS.
    """

    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class GenerateRequest(msgspec.Struct, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    lora_name: str | None = None
    cache_salt: str | None = None
    sampling: SamplingOptions = SamplingOptions()
    # The prompt's block hashes as the router computed them, at `hash_block_size`
    # tokens per hash (0: none sent). Router and replica hash with one function and
    # seed (registration refuses a mismatch), so the replica uses them as they are
    # and a prompt is hashed once on its way through.
    prompt_block_hashes: list[bytes] = []
    hash_block_size: int = 0
    # The router's eviction hint: leading prompt tokens it has seen before
    # (used by replicas running segmented LRU, ignored by LRU ones).
    reuse_hint_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0


class GenerateResult(msgspec.Struct, frozen=True):
    request_id: str
    replica_id: str
    output_token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_s: float
    ttft_s: float
    latency_s: float
    num_preemptions: int = 0


class StreamChunk(msgspec.Struct, frozen=True):
    """Tokens a streaming request produced in one engine step (before it finished),
    with its prompt and cached token counts, so a stream cut short (a stop string)
    can still report usage."""

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class ReplicaCounters(msgspec.Struct):
    """A replica's totals since it started, counted as vLLM's Prometheus counters
    count them: prompt tokens once a request's first token comes, every generated
    token, and prefix-cache lookups (queried and hit tokens) of requests that
    were not preempted."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class ReplicaInfo(msgspec.Struct, frozen=True):
    """What a replica registers with the router before it publishes."""

    replica_id: str
    actor_name: str
    namespace: str
    node_id: str
    kv_cache_config: KVCacheConfig
    hash_block_size: int
    scheduler_block_size: int
    use_eagle: bool
    hash_algo: str
    hash_seed: str
    retention_interval: int | None
    limits: ModelLimits
    event_endpoint: str
    replay_endpoint: str | None
    data_parallel_rank: int = 0
    # The replica's CURVE public key (Z85): its event sockets accept only the
    # routers' key. None: the event plane is not encrypted (events.security: none).
    curve_public_key: str | None = None
    # The replica's data plane (`replicas.data_server`, CURVE with the same key):
    # where a router sends requests without a Ray call. None: Ray calls only.
    data_endpoint: str | None = None


class Snapshot(msgspec.Struct, frozen=True):
    """Every cached block, valid for events with seq < `next_seq`."""

    next_seq: int
    batch: KVEventBatch
