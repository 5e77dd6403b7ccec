"""Read-only views of a running router: `/status` and the `/metrics` scrape.

Kept apart from the service so that what operators see is one place to read. Both
views read the live state at call time and change nothing; replicas are listed in
id order.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from kvroute.events.subscriber import ZmqEventSubscriber
from kvroute.replicas.api import ReplicaLoad
from kvroute.router.core import Router
from kvroute.router.engines.link import ReplicaLink
from kvroute.router.service.metrics import DROP_REASONS, STREAM_COUNTERS, ReplicaView, ScrapeView
from kvroute.router.tier.decisions import DecisionChannel


def status_view(
    name: str,
    core: Router,
    subscriber: ZmqEventSubscriber,
    routed: Mapping[str, ReplicaLink],
    refused: Mapping[str, str],
    decisions: DecisionChannel | None,
    silent: Set[str] = frozenset(),
    loop_lag: Mapping[str, float | int] | None = None,
) -> dict[str, Any]:
    """`RouterService.status()`: what `GET /status` and `kvroute status` show."""
    index = core.index
    replicas = []
    for replica_id, link in sorted(routed.items()):
        stream = subscriber.stats(replica_id)
        served = core.replicas[replica_id]
        reported = served.reported
        replicas.append(
            {
                "replica_id": replica_id,
                "kind": "external" if link.external else "actor",
                "node_id": link.node_id,
                "state": stream.state.value,
                "indexed_blocks": index.replica_block_count(replica_id),
                "cached_blocks": reported.num_cached_blocks,
                "queued_prefill_tokens": reported.queued_prefill_tokens,
                "running_seqs": reported.running_seqs,
                "kv_usage": round(reported.kv_usage, 4),
                "in_flight": served.in_flight,
                "suspect": served.suspect,
                "failing": served.failing,
                "events_silent": replica_id in silent,
                "requests": served.requests,
                "hit_rate": round(served.hit_rate, 4),
                "batches": stream.batches,
                "gaps": stream.gaps,
                "resyncs": stream.resyncs,
                "malformed": stream.malformed,
                "loads_pushed": stream.loads,
            }
        )
    stats = index.stats
    return {
        "router": name,
        "policy": core.policy.name,
        "loop_lag": dict(loop_lag or {}),
        "refused": dict(refused),
        "decisions": None
        if decisions is None
        else {
            "published": decisions.stats.published,
            "send_dropped": decisions.stats.send_dropped,
            "received": decisions.stats.received,
            "lost": decisions.stats.lost,
            "peers": sorted(decisions.peers),
            "live_peers": decisions.live_peers,
            "beats": decisions.stats.beats,
            "peer_predictions": stats.peer_decisions,
            "peer_unknown_replica": stats.peer_unknown_replica,
        },
        "index_entries": len(index),
        "predicted_entries": index.num_predicted(),
        "index_dropped": {reason: getattr(stats, reason) for reason in DROP_REASONS},
        "replicas": replicas,
    }


def scrape_view(
    core: Router,
    subscriber: ZmqEventSubscriber,
    routed: Mapping[str, ReplicaLink],
    desired_replicas: int,
) -> ScrapeView:
    """What /metrics reads at scrape time: stream stats, index size, queue levels."""
    index = core.index
    stats = index.stats
    replicas = []
    for replica_id in sorted(routed):
        stream = subscriber.stats(replica_id)
        state = core.replicas.get(replica_id)
        load = state.load() if state is not None else ReplicaLoad()
        replicas.append(
            ReplicaView(
                replica_id=replica_id,
                stream_state=stream.state.value,
                stream_counts={name: getattr(stream, name) for name in STREAM_COUNTERS},
                indexed_blocks=index.replica_block_count(replica_id),
                in_flight=state.in_flight if state is not None else 0,
                queued_prefill_tokens=load.queued_prefill_tokens,
                running_seqs=load.active_seqs,
            )
        )
    return ScrapeView(
        desired_replicas=desired_replicas,
        index_entries=len(index),
        index_drops={reason: getattr(stats, reason) for reason in DROP_REASONS},
        replicas=replicas,
    )
