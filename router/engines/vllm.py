"""vLLM as an engine kind (and every server that speaks its dialect, `kvroute serve-replica`
and SGLang's load metrics included).

Requests go to `/v1/completions` as the token ids the router hashed, so the engine caches
exactly the blocks the router predicted whatever its chat template or tokenizer settings,
asking for the output's token ids back (`return_token_ids`, vLLM 0.10.2+) and for usage with
`prompt_tokens_details.cached_tokens` (`--enable-prompt-tokens-details`). Its KV events are
vLLM's wire format; its hit rule is vLLM's (the last prompt token is always recomputed).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from kvroute.events.kv_events import KVEventDecoder
from kvroute.replicas.api import GenerateRequest
from kvroute.router.engines.http_engine import HttpEngine
from kvroute.router.engines.kind import EngineAddress, EngineKind
from kvroute.router.index.hit_rules import VLLM_HIT_RULE


class VllmDialect:
    """vLLM's OpenAI-compatible completions, and its (and SGLang's) load metrics."""

    completion_path = "/v1/completions"
    # Prometheus sample name -> ReplicaLoad field.
    load_metrics: Mapping[str, str] = MappingProxyType(
        {
            "vllm:num_requests_running": "running_seqs",
            "vllm:num_requests_waiting": "waiting_seqs",
            "vllm:kv_cache_usage_perc": "kv_usage",
            "vllm:gpu_cache_usage_perc": "kv_usage",
            "sglang:num_running_reqs": "running_seqs",
            "sglang:num_queue_reqs": "waiting_seqs",
            "sglang:token_usage": "kv_usage",
        }
    )

    def completion_body(self, request: GenerateRequest, model: str) -> dict[str, Any]:
        """The `/v1/completions` body that runs `request` on a vLLM server."""
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": request.lora_name or model,
            "prompt": request.prompt_token_ids,
            "max_tokens": request.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if request.cache_salt is not None:
            body["cache_salt"] = request.cache_salt
        return body


VLLM_DIALECT = VllmDialect()


def vllm_engine(address: EngineAddress) -> HttpEngine:
    return HttpEngine(address, VLLM_DIALECT)


KIND = EngineKind(
    name="vllm",
    decoder=KVEventDecoder,
    hit_rule=VLLM_HIT_RULE,
    backend=vllm_engine,
    dialect=VLLM_DIALECT,
)
