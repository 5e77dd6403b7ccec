"""Prometheus metrics of one router (its own registry, so tests can run many).

What the router counts as it goes are counters and histograms. What other parts
already count (event-stream statistics, index drops) or what is a level (queue
depths, stream state) is read at scrape time by `ScrapeCollector`, so a count is
always exposed as a counter and a level as a gauge, and no value is copied twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Serving latencies run from a cached prompt's few milliseconds to a long prompt
# queued behind others for most of a minute.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STREAM_STATES = ("exact", "recovering", "degraded")
STREAM_COUNTERS = ("batches", "events", "gaps", "replays", "resyncs", "malformed")
DROP_REASONS = ("unknown_replica", "unknown_group", "mismatched_group", "bad_hash")


@dataclass
class ReplicaView:
    """One replica as a scrape sees it."""

    replica_id: str
    stream_state: str
    stream_counts: dict[str, int]
    indexed_blocks: int
    in_flight: int
    queued_prefill_tokens: int
    running_seqs: int


@dataclass
class ScrapeView:
    desired_replicas: int = 0
    index_entries: int = 0
    index_drops: dict[str, int] = field(default_factory=dict)
    replicas: list[ReplicaView] = field(default_factory=list)


class ScrapeCollector(Collector):
    def __init__(self, view: Callable[[], ScrapeView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        state = GaugeMetricFamily(
            "kvroute_replica_state",
            "1 for the replica's current event-stream state",
            labels=["replica", "state"],
        )
        streams = CounterMetricFamily(
            "kvroute_event_stream",
            "Event stream counts per replica",
            labels=["replica", "counter"],
        )
        levels = {
            name: GaugeMetricFamily(f"kvroute_replica_{name}", text, labels=["replica"])
            for name, text in (
                ("indexed_blocks", "Indexed (hash, group) entries per replica"),
                ("in_flight", "Requests dispatched to the replica and not finished"),
                ("queued_prefill_tokens", "Prompt tokens waiting for prefill, as last known"),
                ("running_seqs", "Sequences running or waiting, as last known"),
            )
        }
        for replica in view.replicas:
            rid = replica.replica_id
            for name in STREAM_STATES:
                state.add_metric([rid, name], 1 if replica.stream_state == name else 0)
            for name in STREAM_COUNTERS:
                streams.add_metric([rid, name], replica.stream_counts.get(name, 0))
            for name, family in levels.items():
                family.add_metric([rid], getattr(replica, name))
        drops = CounterMetricFamily(
            "kvroute_index_dropped", "Events the index refused, by reason", labels=["reason"]
        )
        for reason in DROP_REASONS:
            drops.add_metric([reason], view.index_drops.get(reason, 0))
        yield state
        yield streams
        yield from levels.values()
        yield drops
        yield GaugeMetricFamily(
            "kvroute_index_entries", "Indexed (hash, group) entries", value=view.index_entries
        )
        yield GaugeMetricFamily(
            "kvroute_replicas_desired", "Replicas the config asks for", value=view.desired_replicas
        )
        yield GaugeMetricFamily(
            "kvroute_replicas_live", "Replicas registered and serving", value=len(view.replicas)
        )


class RouterMetrics:
    def __init__(self, view: Callable[[], ScrapeView] = ScrapeView) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "kvroute_requests", "Routed requests by outcome", ["outcome"], registry=registry
        )
        self.http_responses = Counter(
            "kvroute_http_responses",
            "HTTP responses by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "kvroute_request_errors",
            "Refused or failed requests by kind",
            ["kind"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "kvroute_prompt_tokens", "Prompt tokens routed", registry=registry
        )
        self.cached_tokens = Counter(
            "kvroute_cached_tokens",
            "Prompt tokens served from a replica's prefix cache",
            registry=registry,
        )
        self.predicted_tokens = Counter(
            "kvroute_predicted_hit_tokens",
            "Prompt tokens the index predicted as cached",
            registry=registry,
        )
        self.retries = Counter(
            "kvroute_retries", "Requests retried on another replica", registry=registry
        )
        self.routing_seconds = Histogram(
            "kvroute_routing_seconds",
            "Time to choose a replica (hashing + index + policy)",
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "kvroute_ttft_seconds",
            "Time to first token at the replica (queue + prefill)",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.e2e_ttft_seconds = Histogram(
            "kvroute_e2e_ttft_seconds",
            "Time to first token seen by the router, from the request's arrival",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_seconds = Histogram(
            "kvroute_inter_token_seconds",
            "Time between output tokens of a request",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.redispatches = Counter(
            "kvroute_redispatches",
            "Requests moved to another replica for want of a first token",
            registry=registry,
        )
        self.loop_lag_seconds = Histogram(
            "kvroute_loop_lag_seconds",
            "How late the router's event loop ran a periodic timer",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        registry.register(ScrapeCollector(view))

    def render(self) -> bytes:
        return generate_latest(self.registry)
