"""The router tier: this router's decision channel, and following its peers' channels.

With several routers each knows only its own predictions; sharing every decision
lets a peer predict the blocks it will make the chosen replica hold.

Invariants:
- Each peer is followed at its current endpoint only: a restarted peer binds a new
  port, so a changed endpoint replaces the old one.
- Peers are found by their Ray actor names; one not started or restarting is
  tried again on the next `follow()`.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from kvroute.replicas.kv_cache.prompt import HashedPrompt
from kvroute.router.engines.ray_replica import ACTOR_GONE
from kvroute.router.tier.decisions import DecisionCallback, DecisionChannel, DecisionChannelConfig

logger = logging.getLogger(__name__)


class PeerRouters:
    """Shares this router's decisions and follows those of the routers in `peers`."""

    def __init__(
        self,
        name: str,
        peers: list[str],
        namespace: str,
        on_decision: DecisionCallback,
        config: DecisionChannelConfig,
    ) -> None:
        self.peers = peers
        self.namespace = namespace
        self.channel = DecisionChannel(name, on_decision, config)
        self.channel.start()

    def share(self, replica_id: str, prompt: HashedPrompt) -> None:
        self.channel.share(replica_id, prompt)

    async def follow(self) -> None:
        """Subscribe to each peer router's decisions; a restarted peer binds a new
        port, so a changed endpoint is followed anew."""
        channel = self.channel
        for peer in self.peers:
            try:
                handle = ray.get_actor(peer, namespace=self.namespace)
                endpoint = await asyncio.wait_for(handle.decision_endpoint.remote(), 5.0)
            except (ValueError, TimeoutError, *ACTOR_GONE):
                continue  # not started yet, or restarting
            known = channel.peers.get(peer)
            if endpoint is None or endpoint == known:
                continue
            if known is not None:
                channel.remove_peer(peer)
            channel.add_peer(peer, endpoint)
            logger.info("following the decisions of router %s at %s", peer, endpoint)

    async def close(self) -> None:
        await self.channel.close()
