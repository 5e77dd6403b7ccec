"""vLLM's OpenAI server shapes for a replica's calls: bodies, stream chunks, models.

As vLLM's OpenAI server writes them:
- a completion choice has `index`, `text`, `logprobs`, `finish_reason`,
  `stop_reason`, `token_ids` and `prompt_token_ids` (with `return_token_ids`,
  else null); a chat response has `prompt_token_ids` at the top and `token_ids`
  per choice;
- stream chunks carry only the fields vLLM sets (`prompt_token_ids` in a
  choice's first chunk only), then, with `stream_options.include_usage`, a chunk
  with no choices and the usage;
- `usage.prompt_tokens_details.cached_tokens` with `--enable-prompt-tokens-details`
  (on by default), else `prompt_tokens_details` is null;
- the render endpoints (vLLM's `--enable-scale-out`) answer with vLLM's
  `GenerateRequest`: a list of them, one per prompt, for `/v1/completions/render`,
  one for `/v1/chat/completions/render`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from kvroute.replicas.http_server.generation import ReplicaCall, ReplicaGenerator


def rendered(call: ReplicaCall) -> list[dict[str, Any]]:
    """A call as vLLM's render endpoints return it: per prompt, the token ids the
    engine would run and its sampling parameters (first choice's; `n` counts them).
    Routers tokenize through this (vllm-router's `cache_aware` does)."""
    requests = []
    for p, prompt in enumerate(call.prompts):
        choices = [c for c in call.choices if c.prompt_index == p]
        first = choices[0].request
        sampling = first.sampling
        requests.append(
            {
                "request_id": call.response_id,
                "token_ids": prompt,
                "features": None,
                "sampling_params": {
                    "n": len(choices),
                    "max_tokens": first.max_tokens,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "top_k": sampling.top_k,
                    "seed": sampling.seed,
                    "stop_token_ids": list(sampling.stop_token_ids),
                    "ignore_eos": sampling.ignore_eos,
                },
                "model": call.model,
                "stream": False,
                "cache_salt": first.cache_salt,
                "priority": 0,
                "kv_transfer_params": None,
            }
        )
    return requests


class ReplicaFrontend:
    """vLLM's bodies, chunks and model list for the calls a generator runs."""

    def __init__(self, generator: ReplicaGenerator) -> None:
        self.generator = generator
        self.model = generator.model

    def usage(self, call: ReplicaCall, cached_tokens: int | None) -> dict[str, Any]:
        prompt = sum(len(p) for p in call.prompts)
        completion = sum(len(c.token_ids) for c in call.choices)
        details = None
        if self.model.enable_prompt_tokens_details and cached_tokens is not None:
            details = {"cached_tokens": cached_tokens}
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": details,
        }

    @staticmethod
    def _last_prompt_cached(call: ReplicaCall) -> int:
        """vLLM reports the cached tokens of the batch's last prompt."""
        last = max(c.prompt_index for c in call.choices)
        return next(c.cached_tokens for c in call.choices if c.prompt_index == last)

    def completion_body(self, call: ReplicaCall) -> dict[str, Any]:
        choices = []
        for c in call.choices:
            prompt = call.prompts[c.prompt_index]
            echo = call.echo[c.prompt_index] if call.echo else ""
            token_ids = [*prompt, *c.token_ids] if call.echo else c.token_ids
            choices.append(
                {
                    "index": c.index,
                    "text": echo + c.text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": token_ids if call.return_token_ids else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": prompt if call.return_token_ids else None,
                }
            )
        return self._body(call, "text_completion", choices)

    def chat_body(self, call: ReplicaCall) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {
                    "role": "assistant",
                    "content": c.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "token_ids": c.token_ids if call.return_token_ids else None,
            }
            for c in call.choices
        ]
        prompt_token_ids = call.prompts[0] if call.return_token_ids else None
        return self._body(
            call,
            "chat.completion",
            choices,
            prompt_logprobs=None,
            prompt_token_ids=prompt_token_ids,
        )

    def _body(
        self, call: ReplicaCall, kind: str, choices: list[dict[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        """A whole response in vLLM's field order: `extra` goes just before
        `kv_transfer_params`."""
        return {
            **self._envelope(call, kind),
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(call, self._last_prompt_cached(call)),
            **extra,
            "kv_transfer_params": None,
        }

    def _envelope(self, call: ReplicaCall, kind: str) -> dict[str, Any]:
        return {
            "id": call.response_id,
            "object": kind,
            "created": call.created,
            "model": call.model,
        }

    def _usage_chunk(self, call: ReplicaCall, kind: str, cached: int | None) -> dict[str, Any]:
        """The last chunk with `include_usage`: no choices, the totals, no nulls."""
        usage = {k: v for k, v in self.usage(call, cached).items() if v is not None}
        return {**self._envelope(call, kind), "choices": [], "usage": usage}

    async def completion_chunks(self, call: ReplicaCall) -> AsyncIterator[dict[str, Any]]:
        cached: int | None = None
        async for d in self.generator.merged(call):
            c = d.choice
            if cached is None:
                cached = c.cached_tokens
            prompt = call.prompts[c.prompt_index]
            first = not c.sent_prompt
            c.sent_prompt = True
            echo = call.echo[c.prompt_index] if call.echo and first else ""
            token_ids = [*prompt, *d.token_ids] if echo else d.token_ids
            send_prompt = call.return_token_ids and (first or bool(echo))
            choice = {
                "index": c.index,
                "text": echo + d.text,
                "logprobs": None,
                "finish_reason": c.finish_reason if d.finished else None,
                "stop_reason": c.stop_reason if d.finished else None,
                "prompt_token_ids": prompt if send_prompt else None,
                "token_ids": token_ids if call.return_token_ids else None,
            }
            yield {**self._envelope(call, "text_completion"), "choices": [choice]}
        if call.include_usage:
            yield self._usage_chunk(call, "text_completion", cached)

    async def chat_chunks(self, call: ReplicaCall) -> AsyncIterator[dict[str, Any]]:
        """A role chunk per choice first (with `prompt_token_ids` when asked), then
        content deltas, the last with the finish and stop reasons."""
        kind = "chat.completion.chunk"
        for c in call.choices:
            first: dict[str, Any] = {
                **self._envelope(call, kind),
                "choices": [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            if call.return_token_ids:
                first["prompt_token_ids"] = call.prompts[c.prompt_index]
            yield first
        cached: int | None = None
        async for d in self.generator.merged(call):
            c = d.choice
            if cached is None:
                cached = c.cached_tokens
            choice: dict[str, Any] = {
                "index": c.index,
                "delta": {"content": d.text},
                "logprobs": None,
                "finish_reason": c.finish_reason if d.finished else None,
            }
            if d.finished:
                choice["stop_reason"] = c.stop_reason
            choice["token_ids"] = d.token_ids if call.return_token_ids else None
            yield {**self._envelope(call, kind), "choices": [choice]}
        if call.include_usage:
            yield self._usage_chunk(call, kind, cached)

    def models(self) -> dict[str, Any]:
        """vLLM's model list: the base model, then one card per LoRA adapter."""
        created = int(time.time())
        base = {
            "id": self.model.name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": self.model.root,
            "parent": None,
            "max_model_len": self.model.limits.max_model_len,
            "permission": [_permission(created)],
        }
        adapters = [
            {
                **base,
                "id": name,
                "root": name,
                "parent": self.model.name,
                "max_model_len": None,
                "permission": [_permission(created)],
            }
            for name in self.model.limits.lora_names
        ]
        return {"object": "list", "data": [base, *adapters]}


def _permission(created: int) -> dict[str, Any]:
    return {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
