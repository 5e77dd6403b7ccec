"""The routing decision, free of I/O: predict hits, score, choose, record the prediction.

The router service and the simulator both route through `RoutingCore`, so a
simulated result is the real router's behaviour. Loads are supplied by the
caller: polled from replicas live, read from the engines in simulation.
"""

from __future__ import annotations

from collections.abc import Mapping

from replicas.request import Request
from router.index import KVIndex
from router.policy import Candidate, ReplicaLoad, RouteRequest, RoutingPolicy


class NoReplicaError(RuntimeError):
    """No live replica can take the request (HTTP 503)."""


class RoutingCore:
    def __init__(self, index: KVIndex, policy: RoutingPolicy, use_predictions: bool = True) -> None:
        self.index = index
        self.policy = policy
        self.use_predictions = use_predictions

    def choose(self, request: Request, loads: Mapping[str, ReplicaLoad]) -> tuple[str, int]:
        """The replica for `request` among those in `loads`, and its predicted hit.

        The choice is recorded as a prediction (the prompt's blocks will be cached
        there), so a burst of similar prompts lands together before events arrive.
        """
        if not loads:
            raise NoReplicaError("no replica is available")
        hits = self.index.predict(request, include_predicted=self.use_predictions)
        candidates = [Candidate(rid, hits.get(rid, 0), load) for rid, load in loads.items()]
        choice = self.policy.choose(
            RouteRequest(request.num_tokens, request.block_hashes), candidates
        )
        if self.use_predictions:
            self.index.add_prediction(choice, request)
        return choice, hits.get(choice, 0)
