"""Chat templates: a conversation rendered to the prompt text the model was trained on.

A model directory's `tokenizer_config.json` carries its Jinja2 `chat_template` (a
string, or a list of named templates of which `default` is used), with its
`bos_token` and `eos_token`; that is what vLLM and Hugging Face render. A model
without one gets `DEFAULT_TEMPLATE`, a plain role-tagged format. Templates run in
Jinja2's immutable sandbox: a template is data, and must not reach Python.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvroute.replicas.api import InvalidRequestError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or compiled (a config error, not a request's)."""


def _raise_exception(message: str) -> None:
    """Templates call this to refuse a conversation (e.g. roles out of order)."""
    raise InvalidRequestError(f"the chat template refused the conversation: {message}", "messages")


def _token_text(value: Any) -> str:
    """`bos_token` and friends are a string or an AddedToken-shaped {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, model_dir: str | Path | None) -> ChatTemplate:
        """The template of a Hugging Face model directory, or the default one."""
        if model_dir is None:
            return cls(DEFAULT_TEMPLATE)
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return cls(DEFAULT_TEMPLATE)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ChatTemplateError(f"{path}: not readable JSON ({exc})") from None
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None:
            template = DEFAULT_TEMPLATE
        if not isinstance(template, str):
            raise ChatTemplateError(f"{path}: chat_template must be a string")
        return cls(
            template,
            _token_text(config.get("bos_token")),
            _token_text(config.get("eos_token")),
        )

    def render(self, messages: tuple[dict[str, Any], ...]) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opened."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except InvalidRequestError:
            raise
        except TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template failed on these messages: {exc}", "messages"
            ) from None
