"""Per-request sampling: greedy, temperature, top-k, top-p, seeded.

Each request owns a torch.Generator (from its seed, else from the executor's
seed and its id) and draws exactly one exponential vector per token, so its
tokens depend on its own logits and seed only, never on what it was batched
with. A preempted request keeps its generator: recomputing its KV does not
redraw tokens it already produced.
"""

from __future__ import annotations

import zlib

import torch

from kvroute.replicas.api import MIN_TEMPERATURE
from kvroute.replicas.request import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def sample_rows(
        self, requests: list[tuple[str, SamplingParams]], logits: torch.Tensor
    ) -> tuple[dict[str, int], dict[str, Exception]]:
        """One token per row of logits [len(requests), vocab], by request id; greedy
        rows take one batched argmax. A row whose own generator or parameters fail
        is returned among the failures, and every other row is drawn exactly once."""
        greedy = [i for i, (_, params) in enumerate(requests) if params.temperature <= 0.0]
        argmax = logits[greedy].argmax(-1).tolist()
        tokens = {requests[i][0]: token for i, token in zip(greedy, argmax, strict=True)}
        failed: dict[str, Exception] = {}
        for i, (request_id, params) in enumerate(requests):
            if params.temperature <= 0.0:
                continue
            try:
                tokens[request_id] = self.sample(request_id, params, logits[i])
            except Exception as exc:  # its own generator or parameters: it fails alone
                failed[request_id] = exc
        return tokens, failed

    def sample(self, request_id: str, params: SamplingParams, logits: torch.Tensor) -> int:
        """One token from float32 logits [vocab]."""
        if params.temperature <= 0.0:
            return int(logits.argmax())
        # As vLLM does, a tiny temperature is raised to MIN_TEMPERATURE: dividing
        # logits by less overflows them to inf, and softmax to NaN.
        temperature = max(params.temperature, MIN_TEMPERATURE)
        logits = _top_k_top_p(logits / temperature, params.top_k, params.top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(request_id, params))
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
        return int((probs / noise).argmax())

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            seed = params.seed
            if seed is None:
                seed = zlib.crc32(f"{self.seed}:{request_id}".encode())
            gen = torch.Generator().manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top k, then outside the top-p nucleus of what is left,
    at -inf (the most likely token always stays)."""
    if top_k <= 0 and top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    if top_k > 0:
        sorted_logits[top_k:] = float("-inf")
    if top_p < 1.0:
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token
        outside[0] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return logits.scatter(0, order, sorted_logits)
