"""The official `openai` client, unchanged, against the live router: every endpoint and error."""

from __future__ import annotations

import time

import openai
import pytest
import ray

from tests.cluster.conftest import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def client(deployment: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_model_and_its_adapters(
    client: openai.OpenAI, deployment: Deployment
) -> None:
    models = client.models.list().data
    name = deployment.config.model.name
    assert [(m.id, m.owned_by) for m in models] == [
        (name, "kvroute"),
        *((lora, "kvroute") for lora in deployment.config.model.lora_names),
    ]


def test_completions_of_a_batch_with_two_choices_each(
    client: openai.OpenAI, deployment: Deployment
) -> None:
    name = deployment.config.model.name
    reply = client.completions.create(
        model=name, prompt=["first prompt", "second prompt"], max_tokens=3, n=2, seed=5
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("length", "stop") for c in reply.choices)
    assert reply.usage.prompt_tokens == len("first prompt") + len("second prompt")
    assert reply.usage.completion_tokens <= 12
    assert reply.model == name and reply.object == "text_completion"
    assert reply.system_fingerprint.startswith("fp_") and reply.created > 0


def test_chat_completion_and_a_lora_selected_by_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="support-bot",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=4,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    rendered = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"  # the default template
    assert reply.usage.prompt_tokens == len(rendered.encode()) == 47


def test_streaming_sends_usage_only_when_asked(client: openai.OpenAI) -> None:
    plain = list(
        client.completions.create(model=None, prompt="stream me", max_tokens=4, stream=True)
    )  # type: ignore[arg-type]
    assert all(chunk.usage is None for chunk in plain)
    assert plain[-1].choices[0].finish_reason == "length"
    counted = list(
        client.chat.completions.create(
            model="tiny-hybrid",
            messages=[{"role": "user", "content": "count"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert counted[0].choices[0].delta.role == "assistant"
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 4
    assert all(chunk.usage is None for chunk in counted[:-1])


def test_errors_come_in_openais_shapes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-nope", prompt="x", max_tokens=1)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-hybrid", prompt="x", max_tokens=100_000)
    assert too_long.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="tiny-hybrid", prompt="x", max_tokens=1, logprobs=2)
    assert unsupported.value.param == "logprobs"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny-hybrid", input="x")


def test_an_openai_stream_closed_early_frees_the_replica(
    client: openai.OpenAI, deployment: Deployment
) -> None:
    stream = client.completions.create(
        model="tiny-hybrid", prompt=[2, 3, 4] * 50, max_tokens=3000, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    stream.close()
    live = [r["replica_id"] for r in deployment.client().status()["replicas"]]
    handles = [ray.get_actor(name, namespace="kvroute") for name in live]
    deadline = time.monotonic() + 20
    while any(ray.get(h.load.remote()).running_seqs for h in handles):
        assert time.monotonic() < deadline, "the abandoned stream kept running"
        time.sleep(0.05)
