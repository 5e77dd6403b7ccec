"""Prometheus metrics of one router (its own registry, so tests can run many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "kvroute_requests", "Requests by outcome", ["outcome"], registry=registry
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
            "kvroute_ttft_seconds", "Time to first token, at the replica", registry=registry
        )
        self.replica_state = Gauge(
            "kvroute_replica_state",
            "1 for the replica's current event-stream state",
            ["replica", "state"],
            registry=registry,
        )
        self.replica_blocks = Gauge(
            "kvroute_replica_indexed_blocks",
            "Indexed (hash, group) entries per replica",
            ["replica"],
            registry=registry,
        )
        self.index_entries = Gauge(
            "kvroute_index_entries", "Indexed (hash, group) entries", registry=registry
        )
        self.event_counters = Gauge(
            "kvroute_event_stream",
            "Event stream counters per replica",
            ["replica", "counter"],
            registry=registry,
        )
        self.index_drops = Gauge(
            "kvroute_index_dropped",
            "Events the index refused, by reason",
            ["reason"],
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
