"""Chat templates: a model's own Jinja2 template, the default, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.replicas.api import InvalidRequestError
from kvroute.router.openai.chat import ChatTemplate, ChatTemplateError

MESSAGES = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})


def test_a_model_without_a_template_gets_the_plain_default() -> None:
    assert ChatTemplate.for_model(None).render(MESSAGES) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    )


def test_the_models_template_and_tokens_come_from_tokenizer_config(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}
        )
    )
    rendered = ChatTemplate.for_model(tmp_path).render(MESSAGES)
    assert rendered == "<s>[system] Be brief.</s>[user] Hi</s>[assistant]"


def test_a_list_of_named_templates_uses_default(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "plain"},
                ]
            }
        )
    )
    assert ChatTemplate.for_model(tmp_path).render(MESSAGES) == "plain"


def test_a_template_may_refuse_a_conversation_with_a_400() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(
        InvalidRequestError, match=r"^the chat template refused the conversation: roles must"
    ):
        template.render(MESSAGES)


def test_a_template_cannot_reach_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError, match=r"^the chat template failed on these messages"):
        template.render(MESSAGES)


def test_a_template_that_does_not_compile_is_a_config_error() -> None:
    with pytest.raises(ChatTemplateError, match=r"^the chat template does not compile"):
        ChatTemplate("{% for %}")
