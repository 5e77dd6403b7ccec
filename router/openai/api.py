"""The OpenAI endpoints' logic: a call becomes dispatch units, their outputs a response.

A completions call with P prompts and `n` choices is P x n units; unit (p, j) is
choice index p * n + j, as OpenAI numbers them. Units run concurrently through the
backend (each is routed on its own, so a batch spreads over replicas by cache and
load). Text is assembled by `TextAssembler`, which applies `stop` strings.

Usage counts each prompt once (its first choice's prompt and cached tokens) and
every choice's completion tokens; streamed chunks carry `usage` only when the
client asked with `stream_options.include_usage`, exactly as OpenAI does: null on
every chunk, then one last chunk with no choices and the totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kvroute.replicas.api import StreamChunk
from kvroute.router.openai.detokenize import TextAssembler
from kvroute.router.openai.interleave import interleave
from kvroute.router.openai.protocol import (
    ChatCall,
    CompletionInput,
    CompletionRouter,
    CompletionsCall,
    GenerationParams,
    RoutedResult,
)


@dataclass
class UnitOutput:
    """One choice's progress: text so far; once `finished`, its finish reason, and
    its routed result unless a stop string ended it early (the replica was then
    told to stop, and its counts came with the stream)."""

    index: int
    prompt_index: int
    delta: str = ""
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    finished: bool = False
    routed: RoutedResult | None = None
    first: bool = True


@dataclass
class _Units:
    inputs: list[CompletionInput]
    prompt_of: list[int]
    echo: list[str] = field(default_factory=list)


def _kvroute_section(routed: RoutedResult) -> dict[str, Any]:
    result = routed.result
    return {
        "replica_id": result.replica_id,
        "predicted_hit_tokens": routed.predicted_hit_tokens,
        "reuse_hint_tokens": routed.reuse_hint_tokens,
        "routing_s": routed.routing_s,
        "queue_s": result.queue_s,
        "ttft_s": result.ttft_s,
        "latency_s": result.latency_s,
        "attempts": routed.attempts,
    }


class FrontDoor:
    def __init__(
        self, backend: CompletionRouter, fingerprint: str, expose_routing: bool = True
    ) -> None:
        self.backend = backend
        self.fingerprint = fingerprint
        self.expose_routing = expose_routing

    # ------------------------------------------------------------ expansion

    def _units(self, prompts: list[str | list[int]], params: GenerationParams) -> _Units:
        lora_name = self.backend.resolve_model(params.model)
        if params.lora_name is not None:
            lora_name = params.lora_name
        inputs, prompt_of = [], []
        for p, prompt in enumerate(prompts):
            for j in range(params.n):
                inputs.append(params.inputs(prompt, j, lora_name))
                prompt_of.append(p)
        return _Units(inputs, prompt_of)

    def completions_units(self, call: CompletionsCall) -> _Units:
        units = self._units(list(call.prompts), call.params)
        if call.echo:
            units.echo = [
                p if isinstance(p, str) else self.backend.decode(list(p))
                for p in (call.prompts[i] for i in units.prompt_of)
            ]
        return units

    def chat_units(self, call: ChatCall) -> _Units:
        tokens = self.backend.render_chat(call.messages)
        return self._units([tokens], call.params)

    # ------------------------------------------------------------- running

    async def _run(
        self, index: int, unit: CompletionInput, prompt_index: int, stream: bool
    ) -> AsyncIterator[UnitOutput]:
        """One unit's outputs: text deltas (when streaming), then a last, finished one.
        A stop string ends the unit at once: closing the backend's stream aborts the
        request on its replica."""
        out = UnitOutput(index, prompt_index)
        if not stream and not unit.stop:
            routed = await self.backend.generate(unit)
            self._finish(out, routed)
            out.text = out.delta = self.backend.decode(routed.result.output_token_ids)
            yield out
            return
        assembler = TextAssembler(self.backend.decode, unit.stop)
        items = self.backend.generate_stream(unit)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, StreamChunk):
                    out.completion_tokens += len(item.new_token_ids)
                    out.prompt_tokens = item.num_prompt_tokens
                    out.cached_tokens = item.num_cached_tokens
                    delta = assembler.add(item.new_token_ids, False)
                    if assembler.stopped:
                        out.text, out.finish_reason, out.finished = assembler.text, "stop", True
                        out.delta = delta if stream else out.text
                        yield out
                        return
                    if delta and stream:
                        out.delta = delta
                        yield out
                        out.first = False
                    continue
                tail = assembler.add([], True)
                self._finish(out, item)
                out.text = assembler.text
                out.delta = tail if stream else out.text
                yield out

    @staticmethod
    def _finish(out: UnitOutput, routed: RoutedResult) -> None:
        result = routed.result
        out.routed, out.finished = routed, True
        out.finish_reason = result.finish_reason
        out.completion_tokens = len(result.output_token_ids)
        out.prompt_tokens = result.num_prompt_tokens
        out.cached_tokens = result.num_cached_tokens

    async def collect(self, units: _Units) -> list[UnitOutput]:
        """Every unit to its end, concurrently; the first failure cancels the rest."""

        async def one(i: int) -> UnitOutput:
            outputs = [o async for o in self._run(i, units.inputs[i], units.prompt_of[i], False)]
            return outputs[-1]

        if len(units.inputs) == 1:
            return [await one(0)]  # the common case needs no task of its own
        tasks = [asyncio.ensure_future(one(i)) for i in range(len(units.inputs))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def merged(self, units: _Units) -> AsyncIterator[UnitOutput]:
        """Every unit's outputs as they come, interleaved; cancelled together."""

        async def copies(i: int) -> AsyncIterator[UnitOutput]:
            async for out in self._run(i, units.inputs[i], units.prompt_of[i], True):
                yield dataclasses.replace(out)  # a copy: `out` is reused

        if len(units.inputs) == 1:
            # Read in place: each output is consumed before the next is made.
            streams = [self._run(0, units.inputs[0], units.prompt_of[0], True)]
        else:
            streams = [copies(i) for i in range(len(units.inputs))]
        async with contextlib.aclosing(interleave(streams)) as outputs:
            async for out in outputs:
                yield out

    # ------------------------------------------------------------- bodies

    def _envelope(self, kind: str, request_id: str | None, prefix: str) -> dict[str, Any]:
        return {
            "id": request_id or f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.backend.model_name,
            "system_fingerprint": self.fingerprint,
        }

    def usage(self, outputs: list[UnitOutput]) -> dict[str, Any]:
        """Token counts. `prompt_tokens_details.cached_tokens` is left out with
        `expose_routing` off: it tells a client whether anyone's unsalted prefix is
        cached, the same side channel as the `kvroute` section."""
        first: dict[int, UnitOutput] = {}
        for out in sorted(outputs, key=lambda o: o.index):
            first.setdefault(out.prompt_index, out)
        prompt = sum(o.prompt_tokens for o in first.values())
        cached = sum(o.cached_tokens for o in first.values())
        completion = sum(o.completion_tokens for o in outputs)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.expose_routing:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    @staticmethod
    def kvroute(outputs: list[UnitOutput]) -> dict[str, Any]:
        sections = [_kvroute_section(o.routed) for o in outputs if o.routed is not None]
        if len(sections) == 1:
            return sections[0]
        return {"choices": sections}

    def completion_body(
        self, call: CompletionsCall, units: _Units, outputs: list[UnitOutput]
    ) -> dict[str, Any]:
        def choice(o: UnitOutput) -> dict[str, Any]:
            return {"text": (units.echo[o.index] if units.echo else "") + o.text}

        return self._body("text_completion", "cmpl", call.params, outputs, choice)

    def chat_body(self, call: ChatCall, outputs: list[UnitOutput]) -> dict[str, Any]:
        def choice(o: UnitOutput) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": o.text}}

        return self._body("chat.completion", "chatcmpl", call.params, outputs, choice)

    def _body(
        self,
        kind: str,
        prefix: str,
        params: GenerationParams,
        outputs: list[UnitOutput],
        content: Callable[[UnitOutput], dict[str, Any]],
    ) -> dict[str, Any]:
        """A whole response: one choice per unit in index order, with its `content`."""
        outputs = sorted(outputs, key=lambda o: o.index)
        choices = [
            {"index": o.index, **content(o), "logprobs": None, "finish_reason": o.finish_reason}
            for o in outputs
        ]
        body = {
            **self._envelope(kind, params.request_id, prefix),
            "choices": choices,
            "usage": self.usage(outputs),
        }
        if self.expose_routing:
            body["kvroute"] = self.kvroute(outputs)
        return body

    async def completion_chunks(
        self, call: CompletionsCall, units: _Units
    ) -> AsyncIterator[dict[str, Any]]:
        """SSE payloads for a streamed completion, in order."""
        envelope = self._envelope("text_completion", call.params.request_id, "cmpl")
        async for chunk in self._chunks(call.params, units, envelope, self._text_choice):
            yield chunk

    async def chat_chunks(self, call: ChatCall, units: _Units) -> AsyncIterator[dict[str, Any]]:
        envelope = self._envelope("chat.completion.chunk", call.params.request_id, "chatcmpl")
        async for chunk in self._chunks(call.params, units, envelope, self._chat_choice):
            yield chunk

    @staticmethod
    def _text_choice(out: UnitOutput, units: _Units) -> dict[str, Any]:
        echo = units.echo[out.index] if units.echo and out.first else ""
        return {
            "index": out.index,
            "text": echo + out.delta,
            "logprobs": None,
            "finish_reason": out.finish_reason if out.finished else None,
        }

    @staticmethod
    def _chat_choice(out: UnitOutput, units: _Units) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": out.delta} if out.delta else {}
        if out.first:
            delta = {"role": "assistant", **delta}
        return {
            "index": out.index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": out.finish_reason if out.finished else None,
        }

    async def _chunks(
        self, params: GenerationParams, units: _Units, envelope: dict[str, Any], choice: Any
    ) -> AsyncIterator[dict[str, Any]]:
        finished: list[UnitOutput] = []
        async for out in self.merged(units):
            chunk = {**envelope, "choices": [choice(out, units)]}
            if out.finished:
                finished.append(out)
            if out.routed is not None and self.expose_routing:
                chunk["kvroute"] = _kvroute_section(out.routed)
            if params.include_usage:
                chunk["usage"] = None
            yield chunk
        if params.include_usage:
            yield {**envelope, "choices": [], "usage": self.usage(finished)}
