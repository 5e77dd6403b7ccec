"""The bundled workload that `kvroute run` replays: tenants sharing system prompts.

Each request is one tenant's system prompt followed by a fresh question, as
token ids; the order interleaves tenants at random, so a router that keeps
each tenant on one replica turns most prefill into cache hits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvroute.router.config import WorkloadConfig


@dataclass(frozen=True)
class WorkloadRequest:
    tenant: int
    prompt_token_ids: list[int]
    max_tokens: int


def shared_prefix_workload(config: WorkloadConfig, vocab_size: int) -> list[WorkloadRequest]:
    rng = random.Random(config.seed)
    systems = [
        [rng.randrange(vocab_size) for _ in range(config.system_prompt_tokens)]
        for _ in range(config.tenants)
    ]
    requests = []
    for _ in range(config.requests):
        tenant = rng.randrange(config.tenants)
        question = [rng.randrange(vocab_size) for _ in range(config.question_tokens)]
        requests.append(WorkloadRequest(tenant, systems[tenant] + question, config.max_tokens))
    return requests
