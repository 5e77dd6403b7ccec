"""`kvroute serve-replica`: vLLM's HTTP shapes, metrics, KV events and hash seeds."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.replicas.http_server.serve import hash_root
from kvroute.replicas.kv_cache.utils import BlockHash, hash_block_tokens, maybe_convert_block_hash
from kvroute.router.app.cli import main
from kvroute.router.engines.http_engine import metrics_url
from tests.replicas.serve_helpers import (
    BLOCK,
    DEADLINE_S,
    events_json,
    serve_replica,
    stored_hashes,
    subscriber,
    tiny_config,
)

pytestmark = pytest.mark.timeout(120)

PROMPT = "0123456789"  # 10 byte tokens: 2 full blocks of 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected_event_hashes(root: BlockHash, algo: str, tokens: list[int]) -> list[int]:
    """The chain vLLM computes: hash_fn((parent or NONE_HASH, block tokens, None))."""
    hash_fn = get_hash_fn_by_name(algo)
    parent, out = root, []
    for start in range(0, len(tokens) // BLOCK * BLOCK, BLOCK):
        parent = hash_block_tokens(hash_fn, parent, tokens[start : start + BLOCK])
        out.append(int(maybe_convert_block_hash(parent)))
    return out


@dataclass
class Reply:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json.loads(self.content)


def fetch(url: str, data: bytes | None = None) -> Reply:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as reply:
            return Reply(reply.status, reply.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read())


def post(url: str, path: str, body: object) -> Reply:
    return fetch(url + path, json.dumps(body).encode())


def sse_events(response: Reply) -> list[str]:
    """The raw `data:` payloads; every event must be exactly `data: ...\\n\\n`."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e.removeprefix("data: ") for e in events]


def test_a_repeated_prompt_reports_its_full_blocks_as_cached(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path)) as server:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "return_token_ids": True}
        first = post(server.url, "/v1/completions", body).json()
        second = post(server.url, "/v1/completions", body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"] == {
        "prompt_tokens": 10,
        "total_tokens": 13,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 2 * BLOCK},
    }
    choice = second["choices"][0]
    assert choice["prompt_token_ids"] == list(PROMPT.encode())
    assert len(choice["token_ids"]) == 3 and choice["finish_reason"] == "length"
    assert second["object"] == "text_completion" and second["id"].startswith("cmpl-")


def test_prompt_tokens_details_is_null_when_disabled(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path), enable_prompt_tokens_details=False) as server:
        body = {"prompt": [1, 2, 3], "max_tokens": 1}
        usage = post(server.url, "/v1/completions", body).json()["usage"]
    assert usage["prompt_tokens_details"] is None


def test_streamed_chunks_carry_token_ids_and_end_with_done(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path)) as server:
        body = {
            "prompt": PROMPT,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        events = sse_events(post(server.url, "/v1/completions", body))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert choices[0]["prompt_token_ids"] == list(PROMPT.encode())
    assert all(c["prompt_token_ids"] is None for c in choices[1:])
    assert sum(len(c["token_ids"]) for c in choices) == 4
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4


def test_the_openai_client_completes_streams_and_chats(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=DEADLINE_S)
        done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
        stream = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=3,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        streamed = [chunk.choices[0].model_extra["token_ids"] for chunk in stream]
        chat = client.chat.completions.create(
            model="adapter-a", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        models = [m.id for m in client.models.list()]
    assert done.usage is not None and done.usage.completion_tokens == 3
    assert sum(len(ids) for ids in streamed) == 3
    assert chat.model == "adapter-a" and chat.choices[0].finish_reason == "length"
    assert models == ["tiny", "adapter-a"]


def test_metrics_are_vllms_and_exact_after_requests(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path), rank=0) as server:
        for _ in range(2):
            post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        text = fetch(server.url + "/metrics").text
    samples = {
        s.name: (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm:") and not s.name.endswith("_created")
    }
    labels = {"model_name": "tiny", "engine": "0"}
    assert samples == {
        "vllm:num_requests_running": (labels, 0.0),
        "vllm:num_requests_waiting": (labels, 0.0),
        "vllm:kv_cache_usage_perc": (labels, 0.0),
        "vllm:prefix_cache_queries_total": (labels, 20.0),
        "vllm:prefix_cache_hits_total": (labels, 8.0),
        "vllm:prompt_tokens_total": (labels, 20.0),
        "vllm:generation_tokens_total": (labels, 6.0),
        "vllm:request_success_total": (labels, 2.0),
    }


def test_metrics_named_in_the_query_come_alone_as_prometheus_clients_app_sends_them(
    tmp_path: Path,
) -> None:
    """The router's load scrape asks for its samples by `name[]`: the engine sends
    those, not every family."""
    with serve_replica(tiny_config(tmp_path), rank=0) as server:
        post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        url = metrics_url(server.url, ["vllm:num_requests_running", "vllm:kv_cache_usage_perc"])
        text = fetch(url).text
    names = [s.name for family in text_string_to_metric_families(text) for s in family.samples]
    assert names == ["vllm:num_requests_running", "vllm:kv_cache_usage_perc"]


def test_bad_input_gets_vllms_error_envelope(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path)) as server:
        bad_json = fetch(server.url + "/v1/completions", b"{bad")
        unknown = post(server.url, "/v1/completions", {"model": "nope", "prompt": "x"})
        too_long = post(server.url, "/v1/completions", {"prompt": [1] * 1020, "max_tokens": 8})
        health = fetch(server.url + "/health")
        tokenized = post(server.url, "/tokenize", {"model": "tiny", "prompt": "hi"}).json()
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "BadRequestError"
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    assert health.status_code == 200 and health.content == b""
    assert tokenized == {
        "count": 2,
        "max_model_len": 1024,
        "tokens": [104, 105],
        "token_strs": None,
    }


def test_a_client_that_leaves_mid_stream_aborts_its_request(tmp_path: Path) -> None:
    # 10 ms steps and up to 1,000 tokens: the request runs ~10 s unless aborted.
    with serve_replica(tiny_config(tmp_path, step_s=0.01)) as server:
        aborted: list[tuple[str, bool]] = []
        engine = server.process.engine
        abort = engine.abort_request

        def spy(request_id: str) -> bool:
            result = abort(request_id)
            aborted.append((request_id, result))
            return result

        engine.abort_request = spy  # type: ignore[method-assign]
        body = {"prompt": PROMPT, "max_tokens": 1000, "stream": True}
        address = urlsplit(server.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
        connection.request("POST", "/v1/completions", json.dumps(body))
        reply = connection.getresponse()
        assert reply.readline().startswith(b"data: ")  # the first chunk: the request runs
        connection.close()
        deadline = time.monotonic() + DEADLINE_S
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        load = server.call(server.process.core.load)
        in_flight = server.call(lambda: server.process.core.in_flight)
    assert [result for _, result in aborted] == [True]  # it was still in the engine
    assert (in_flight, load.running_seqs, load.waiting_seqs, load.kv_usage) == (0, 0, 0, 0.0)


def test_events_arrive_on_a_zmq_sub_in_vllms_frames(tmp_path: Path) -> None:
    port = free_port()
    config = tiny_config(tmp_path, seed="7")
    with serve_replica(config, events_json(port)) as server:
        ctx, sub = subscriber(f"tcp://127.0.0.1:{port}", b"kv")
        try:
            time.sleep(0.2)  # a SUB misses what is published before it joins
            post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
            frames, hashes = stored_hashes(sub, 2)
        finally:
            sub.close(linger=0)
            ctx.term()
    sha256 = get_hash_fn_by_name("sha256")
    expected = expected_event_hashes(BlockHash(sha256("7")), "sha256", list(PROMPT.encode()))
    assert hashes == expected
    topic, seq, _ = frames[0]
    assert topic == b"kv" and len(seq) == 8 and int.from_bytes(seq, "big") == 0


def test_pythonhashseed_roots_hashes_as_vllm_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM: NONE_HASH = hash_fn(PYTHONHASHSEED), else 32 random bytes; a pinned
    hashing.seed wins over both."""
    sha256 = get_hash_fn_by_name("sha256")
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert hash_root("sha256", None)[0] == sha256("7") == hash_root("sha256", "7")[0]
    assert hash_root("sha256", "pinned")[0] == sha256("pinned")
    monkeypatch.delenv("PYTHONHASHSEED")
    first, second = hash_root("sha256", None)[0], hash_root("sha256", None)[0]
    assert first != second and len(first) == 32


def test_pythonhashseed_gives_the_same_event_hashes_as_the_pinned_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    port = free_port()
    with serve_replica(tiny_config(tmp_path), events_json(port)) as server:
        ctx, sub = subscriber(f"tcp://127.0.0.1:{port}")
        try:
            time.sleep(0.2)
            post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
            _, hashes = stored_hashes(sub, 2)
        finally:
            sub.close(linger=0)
            ctx.term()
    root = BlockHash(get_hash_fn_by_name("sha256")("7"))
    assert hashes == expected_event_hashes(root, "sha256", list(PROMPT.encode()))


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ('{"enable_kv_cache_events": true, "bogus": 1}', "unknown field `bogus`"),
        ('{"enable_kv_cache_events": "yes"}', "Expected `bool`"),
        ("not json", "not a JSON object"),
        ('{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}', "--allow-insecure"),
    ],
)
def test_a_bad_kv_events_config_is_one_clear_error_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: str, message: str
) -> None:
    config = str(tiny_config(tmp_path))
    code = main(["serve-replica", config, "--port", "0", "--kv-events-config", events])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --kv-events-config") and message in err


def test_render_endpoints_return_vllms_generate_requests_without_running_them(
    tmp_path: Path,
) -> None:
    with serve_replica(tiny_config(tmp_path), rank=0) as server:
        body = {"model": "tiny", "prompt": [PROMPT, "hi"], "max_tokens": 3, "n": 2, "seed": 7}
        completions = post(server.url, "/v1/completions/render", body).json()
        chat_body = {"model": "adapter-a", "messages": [{"role": "user", "content": "hi"}]}
        chat = post(server.url, "/v1/chat/completions/render", chat_body).json()
        chat_tokens = post(server.url, "/tokenize", chat_body).json()["tokens"]
        unknown = post(server.url, "/v1/completions/render", {"model": "nope", "prompt": "x"})
        metrics = fetch(server.url + "/metrics").text
    assert [r["token_ids"] for r in completions] == [list(PROMPT.encode()), list(b"hi")]
    first = completions[0]
    assert first["request_id"].startswith("cmpl-") and first["model"] == "tiny"
    assert first["sampling_params"] == {
        "n": 2,
        "max_tokens": 3,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 7,
        "stop_token_ids": [],
        "ignore_eos": False,
    }
    assert chat["request_id"].startswith("chatcmpl-") and chat["model"] == "adapter-a"
    assert chat["token_ids"] == chat_tokens
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    # Rendering runs nothing: no prompt reached the engine.
    assert 'vllm:prompt_tokens_total{engine="0",model_name="tiny"} 0.0' in metrics
