"""A replica request run on its engine: expanded to choices, their text and finish.

A call with P prompts and `n` choices is P x n engine requests; choice (p, j) is
index p * n + j, and each runs as its own stream. Text is assembled by
`TextAssembler`, which applies `stop` strings; the text of a token that stopped
generation (EOS or a stop token id) is not in `text`, but is in `token_ids`, as
vLLM leaves it. `stop_reason` is the stop string or stop token id (None for EOS
and length). Closing a choice's stream aborts its request, so its blocks are freed
before the engine's next step.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kvroute.replicas.api import (
    GenerateRequest,
    GenerateResult,
    validate_generate,
    validate_sampling,
)
from kvroute.replicas.http_server.backend import ServedEngine, ServedModel
from kvroute.router.openai.chat import ChatTemplate
from kvroute.router.openai.detokenize import TextAssembler
from kvroute.router.openai.interleave import interleave
from kvroute.router.openai.protocol import (
    ChatCall,
    CompletionsCall,
    GenerationParams,
    ModelNotFoundError,
)
from kvroute.router.openai.tokenizer import Tokenizer


@dataclass
class Choice:
    """One choice of one prompt as it runs: what is known so far."""

    index: int
    prompt_index: int
    request: GenerateRequest
    stop: tuple[str, ...]
    stop_tokens: frozenset[int]  # ids that end generation: stop_token_ids, EOS
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sent_prompt: bool = False  # a stream sent prompt_token_ids (first chunk only)


@dataclass
class Delta:
    """A choice's new text and tokens; `finished` on its last."""

    choice: Choice
    text: str
    token_ids: list[int]
    finished: bool


@dataclass
class ReplicaCall:
    """A request expanded to choices, with what every response of it shares."""

    response_id: str
    model: str
    created: int
    prompts: list[list[int]]
    choices: list[Choice]
    return_token_ids: bool
    include_usage: bool
    echo: list[str] = field(default_factory=list)


class ReplicaGenerator:
    """Calls on one backend: a request expanded to choices, each run to its finish
    with vLLM's text, finish reason and stop reason."""

    def __init__(
        self,
        backend: ServedEngine,
        model: ServedModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
    ) -> None:
        self.backend = backend
        self.model = model
        self.tokenizer = tokenizer
        self.template = template

    def resolve_model(self, name: Any) -> str | None:
        """The LoRA adapter `model` names (None: the base model); vLLM's 404 otherwise."""
        if name is None or name == self.model.name:
            return None
        if not isinstance(name, str) or name not in self.model.limits.lora_names:
            raise ModelNotFoundError(str(name))
        return name

    def render_chat(self, messages: tuple[dict[str, Any], ...]) -> list[int]:
        text = self.template.render(messages)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _call(
        self,
        prefix: str,
        prompts: list[list[int]],
        params: GenerationParams,
        return_token_ids: bool,
    ) -> ReplicaCall:
        lora_name = self.resolve_model(params.model)
        limits = self.model.limits
        stop_ids = frozenset(params.sampling.stop_token_ids)
        if not params.sampling.ignore_eos:
            stop_ids |= frozenset(self.model.eos_token_ids)
        for prompt in prompts:
            max_tokens = params.max_tokens or limits.max_model_len - len(prompt)
            validate_generate(prompt, max_tokens, lora_name, limits)
        internal = uuid.uuid4().hex
        choices = []
        for p, prompt in enumerate(prompts):
            for j in range(params.n):
                unit = params.inputs(prompt, j, lora_name)
                validate_sampling(unit.sampling, limits.vocab_size)
                choices.append(
                    Choice(
                        index=len(choices),
                        prompt_index=p,
                        request=GenerateRequest(
                            request_id=f"{prefix}-{internal}-{len(choices)}",
                            prompt_token_ids=prompt,
                            max_tokens=params.max_tokens or limits.max_model_len - len(prompt),
                            lora_name=lora_name,
                            cache_salt=params.cache_salt,
                            sampling=unit.sampling,
                        ),
                        stop=params.stop,
                        stop_tokens=stop_ids,
                    )
                )
        return ReplicaCall(
            response_id=f"{prefix}-{params.request_id or uuid.uuid4().hex}",
            model=lora_name or self.model.name,
            created=int(time.time()),
            prompts=prompts,
            choices=choices,
            return_token_ids=return_token_ids,
            include_usage=params.include_usage,
        )

    def completions_call(self, call: CompletionsCall, return_token_ids: bool) -> ReplicaCall:
        prompts = [
            self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in call.prompts
        ]
        expanded = self._call("cmpl", prompts, call.params, return_token_ids)
        if call.echo:
            expanded.echo = [
                p if isinstance(p, str) else self.tokenizer.decode(list(p)) for p in call.prompts
            ]
        return expanded

    def chat_call(self, call: ChatCall, return_token_ids: bool) -> ReplicaCall:
        prompt = self.render_chat(call.messages)
        return self._call("chatcmpl", [prompt], call.params, return_token_ids)

    # ------------------------------------------------------------- running

    async def _run(self, choice: Choice) -> AsyncIterator[Delta]:
        """One choice's deltas. The engine finishes a request on a token of
        `stop_tokens` or at `max_tokens` (length first), so the chunk that finishes
        is known when it comes and carries the finish reason, as in vLLM."""
        request = choice.request
        assembler = TextAssembler(self.tokenizer.decode, choice.stop)
        items = self.backend.generate_stream(request)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, GenerateResult):  # finished without a new token
                    yield self._finish(choice, assembler, [], item)
                    return
                new = list(item.new_token_ids)
                choice.token_ids.extend(new)
                choice.prompt_tokens = item.num_prompt_tokens
                choice.cached_tokens = item.num_cached_tokens
                length = len(choice.token_ids) >= request.max_tokens
                if length or new[-1] in choice.stop_tokens:
                    result = await anext(items)
                    assert isinstance(result, GenerateResult)
                    yield self._finish(choice, assembler, new, result)
                    return
                text = assembler.add(new, False)
                if assembler.stopped:
                    self._stopped_by_string(choice, assembler)
                    yield Delta(choice, text, new, True)
                    return  # closing the stream aborts the request
                yield Delta(choice, text, new, False)

    def _finish(
        self, choice: Choice, assembler: TextAssembler, new: list[int], result: GenerateResult
    ) -> Delta:
        """The last delta: a stop token's own text is left out, as vLLM leaves it."""
        reason = result.finish_reason
        by_token = reason == "stop" and bool(choice.token_ids)
        text_ids = new[:-1] if by_token and new else new
        text = assembler.add(text_ids, True)
        if assembler.stopped:
            self._stopped_by_string(choice, assembler)
            return Delta(choice, text, new, True)
        choice.text = assembler.text
        choice.finish_reason = reason
        last = choice.token_ids[-1] if by_token else None
        eos = () if choice.request.sampling.ignore_eos else self.model.eos_token_ids
        if last is not None and last not in eos and last in choice.request.sampling.stop_token_ids:
            choice.stop_reason = last
        return Delta(choice, text, new, True)

    def _stopped_by_string(self, choice: Choice, assembler: TextAssembler) -> None:
        choice.text = assembler.text
        choice.finish_reason = "stop"
        decoded = self.tokenizer.decode(choice.token_ids)
        cut = len(assembler.text)
        choice.stop_reason = next((s for s in choice.stop if decoded.startswith(s, cut)), None)

    async def collect(self, call: ReplicaCall) -> None:
        """Every choice to its end, concurrently; the first failure cancels the rest."""
        async with contextlib.aclosing(self.merged(call)) as deltas:
            async for _ in deltas:
                pass

    async def merged(self, call: ReplicaCall) -> AsyncIterator[Delta]:
        """Every choice's deltas as they come, interleaved; cancelled together."""
        if len(call.choices) == 1:
            async for delta in self._run(call.choices[0]):
                yield delta
            return
        streams = [self._run(choice) for choice in call.choices]
        async with contextlib.aclosing(interleave(streams)) as deltas:
            async for delta in deltas:
                yield delta
