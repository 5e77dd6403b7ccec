"""A replica takes the router's prompt hashes when they are its own, and hashes otherwise."""

from __future__ import annotations

import msgspec

from kvroute.configs import CONFIG_DIR
from kvroute.events.curve import CurveKeyPair
from kvroute.replicas.actor import ReplicaServer
from kvroute.replicas.api import GenerateRequest
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.request import SamplingParams
from kvroute.router.config import load_config
from kvroute.router.core import Router, router_settings
from kvroute.router.policy import make_policy

PROMPT = list(range(1, 41))  # 2 full blocks of 16 tokens and 8 more


def server_and_router() -> tuple[ReplicaServer, Router]:
    config = load_config(CONFIG_DIR / "default.yaml")
    config = msgspec.structs.replace(
        config, replicas=msgspec.structs.replace(config.replicas, executor="simulated")
    )
    router_key = CurveKeyPair.generate().public_key
    server = ReplicaServer("replica-0", config.replica_settings(), "router", 0, router_key)
    settings = router_settings(config.router, config.hashing, config.model, config.engine_count)
    return server, Router(settings, make_policy("round_robin"))


def test_the_router_hashes_are_the_replicas_own() -> None:
    server, router = server_and_router()
    hashed = router.prepare(PromptKeys(tuple(PROMPT)), 1).prompt
    wire = GenerateRequest(
        "r",
        PROMPT,
        1,
        prompt_block_hashes=list(hashed.block_hashes),
        hash_block_size=router.hasher.block_size,
    )
    reused = server.core._router_hashes(wire)
    assert reused is not None and len(reused) == 2
    own = server.engine.add_request("own", PROMPT, SamplingParams(max_tokens=1)).block_hashes
    assert reused == own


def test_hashes_at_another_size_or_beyond_the_prompt_are_not_used() -> None:
    server, router = server_and_router()
    hashes = list(router.prepare(PromptKeys(tuple(PROMPT)), 1).prompt.block_hashes)
    size = router.hasher.block_size
    other_size = GenerateRequest("r", PROMPT, 1, prompt_block_hashes=hashes, hash_block_size=8)
    assert server.core._router_hashes(other_size) is None
    too_many = GenerateRequest(
        "r", PROMPT[:20], 1, prompt_block_hashes=hashes, hash_block_size=size
    )
    assert server.core._router_hashes(too_many) is None
    assert server.core._router_hashes(GenerateRequest("r", PROMPT, 1)) is None
