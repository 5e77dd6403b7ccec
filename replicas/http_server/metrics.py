"""A replica's Prometheus metrics under vLLM's names (`vllm:*`), read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvroute.replicas.http_server.backend import ServedEngine, ServedModel

METRIC_HELP = {
    "num_requests_running": "Number of requests in model execution batches.",
    "num_requests_waiting": "Number of requests waiting to be processed.",
    "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
    "request_success": "Count of successfully processed requests.",
}


@dataclass
class RequestTally:
    """Requests the server answered in full (every choice finished, the body or the
    stream's `[DONE]` sent): vLLM's `vllm:request_success`, without its
    `finished_reason` label. Benchmarks read requests per engine from it."""

    success: int = 0


class ReplicaCollector(Collector):
    """vLLM's metric names, read from the backend at scrape time (levels as gauges,
    totals as counters), labelled `model_name` and `engine` as vLLM labels them."""

    def __init__(self, backend: ServedEngine, model: ServedModel, tally: RequestTally) -> None:
        self._backend = backend
        self._tally = tally
        self._labels = [model.name, str(model.engine_index)]

    def collect(self) -> Iterator[Metric]:
        load = self._backend.load()
        totals = self._backend.counters()
        names = ["model_name", "engine"]
        levels = {
            "num_requests_running": load.running_seqs,
            "num_requests_waiting": load.waiting_seqs,
            "kv_cache_usage_perc": load.kv_usage,
        }
        counts = {
            "prefix_cache_queries": totals.prefix_cache_queries,
            "prefix_cache_hits": totals.prefix_cache_hits,
            "prompt_tokens": totals.prompt_tokens,
            "generation_tokens": totals.generation_tokens,
            "request_success": self._tally.success,
        }
        families = ((GaugeMetricFamily, levels), (CounterMetricFamily, counts))
        for family, values in families:
            for name, value in values.items():
                metric = family(f"vllm:{name}", METRIC_HELP[name], labels=names)
                metric.add_metric(self._labels, value)
                yield metric
