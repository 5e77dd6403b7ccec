"""A toy engine kind, added the way any new kind is: this one module, plus one line in
`ENGINE_KINDS` (the tests add it with `monkeypatch.setitem`).

It differs from vLLM in each of the four places a kind can: requests go to
`/toy/generate` with `input_ids`; load comes from `toy:*` gauges; its KV events are JSON
(`{"ts", "stored": [{"hashes", "parent", "tokens", "block_size"}], "removed": [[...]]}`);
and it keeps the last prompt position's logits, so a fully cached prompt is a full hit.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import msgspec

from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.kv_events import (
    BlockRemoved,
    BlockStored,
    DecodeLimits,
    KVCacheEvent,
    KVEventBatch,
)
from kvroute.replicas.api import GenerateRequest
from kvroute.router.engines.http_engine import HttpEngine
from kvroute.router.engines.kind import EngineAddress, EngineKind
from kvroute.router.index.hit_rules import HitRule


class ToyDialect:
    completion_path = "/toy/generate"
    load_metrics = MappingProxyType({"toy:running": "running_seqs", "toy:waiting": "waiting_seqs"})

    def completion_body(self, request: GenerateRequest, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "input_ids": request.prompt_token_ids,
            "max_new_tokens": request.max_tokens,
            "stream": True,
        }


class ToyStored(msgspec.Struct):
    hashes: list[int]
    parent: int | None
    tokens: list[int]
    block_size: int


class ToyBatch(msgspec.Struct):
    ts: float
    stored: list[ToyStored] = []
    removed: list[list[int]] = []


class JsonEventDecoder:
    """The toy's JSON events, as the `KVEventBatch`es the index applies."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self._decoder = msgspec.json.Decoder(ToyBatch)

    def decode(self, payload: bytes | memoryview) -> KVEventBatch:
        try:
            batch = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise MalformedInputError(MalformedKind.WRONG_TYPE, str(exc)) from None
        events: list[KVCacheEvent] = [
            BlockStored(
                block_hashes=list(s.hashes),
                parent_block_hash=s.parent,
                token_ids=s.tokens,
                block_size=s.block_size,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
            for s in batch.stored
        ]
        events += [BlockRemoved(block_hashes=list(r), medium="GPU") for r in batch.removed]
        return KVEventBatch(ts=batch.ts, events=events)


TOY_DIALECT = ToyDialect()
KEEPS_LAST_LOGITS = HitRule("toy-keeps-last-logits", recomputes_last_token=False)


def toy_engine(address: EngineAddress) -> HttpEngine:
    return HttpEngine(address, TOY_DIALECT)


KIND = EngineKind(
    name="toy",
    decoder=JsonEventDecoder,
    hit_rule=KEEPS_LAST_LOGITS,
    backend=toy_engine,
    dialect=TOY_DIALECT,
)
