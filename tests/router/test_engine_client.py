"""What the router sends an external engine, and how it reads the engine's load."""

from __future__ import annotations

from replicas.api import GenerateRequest, ReplicaLoad, SamplingOptions
from router.engine_client import completion_body, parse_load

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 5.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


def test_the_body_sends_the_hashed_token_ids_and_asks_for_tokens_and_usage() -> None:
    request = GenerateRequest(
        request_id="kv-1",
        prompt_token_ids=[5, 6, 7],
        max_tokens=9,
        cache_salt="tenant-a",
        sampling=SamplingOptions(temperature=0.0, top_k=4, seed=11, stop_token_ids=(2,)),
    )
    assert completion_body(request, "base") == {
        "model": "base",
        "prompt": [5, 6, 7],
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 4,
        "seed": 11,
        "stop_token_ids": [2],
        "cache_salt": "tenant-a",
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


def test_a_lora_request_names_the_adapter_as_its_model() -> None:
    request = GenerateRequest("kv-2", [1], 1, lora_name="sql")
    body = completion_body(request, "base")
    assert body["model"] == "sql"
    assert "cache_salt" not in body and "top_k" not in body and "seed" not in body


def test_load_comes_from_vllm_metric_names() -> None:
    assert parse_load(VLLM_METRICS) == ReplicaLoad(running_seqs=3, waiting_seqs=5, kv_usage=0.25)


def test_load_sums_a_data_parallel_engines_label_sets() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0"} 2.0\n'
        'vllm:num_requests_running{engine="1"} 4.0\n'
    )
    assert parse_load(text) == ReplicaLoad(running_seqs=6)


def test_load_reads_sglang_metric_names() -> None:
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        "sglang:num_running_reqs 7.0\n"
        "# TYPE sglang:num_queue_reqs gauge\n"
        "sglang:num_queue_reqs 1.0\n"
        "# TYPE sglang:token_usage gauge\n"
        "sglang:token_usage 0.5\n"
    )
    assert parse_load(text) == ReplicaLoad(running_seqs=7, waiting_seqs=1, kv_usage=0.5)


def test_an_engine_without_load_metrics_reports_idle() -> None:
    assert parse_load("# TYPE up gauge\nup 1.0\n") == ReplicaLoad()
