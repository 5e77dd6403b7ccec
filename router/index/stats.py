"""Counters of what the index applied and what it refused, shared by its parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("kvroute.router.index")


@dataclass
class IndexStats:
    batches: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    unknown_replica: int = 0
    unknown_group: int = 0
    mismatched_group: int = 0
    bad_hash: int = 0
    removed_unknown: int = 0
    # BlockStored events a hash-agnostic replica sent that could not be re-keyed.
    unkeyable: int = 0
    # Batches a replica published before a prefix-cache reset the router asked for.
    stale_after_reset: int = 0
    predictions_added: int = 0
    predictions_confirmed: int = 0
    predictions_expired: int = 0
    # Other routers' decisions (router/peer.py): applied, and ignored by reason.
    peer_decisions: int = 0
    peer_unknown_replica: int = 0
    peer_mismatched: int = 0
    dropped_kinds: set[str] = field(default_factory=set)

    def log_once(self, kind: str, message: str, *args: object) -> None:
        """Warn about the first drop of each kind only: a bad source repeats itself."""
        if kind not in self.dropped_kinds:
            self.dropped_kinds.add(kind)
            logger.warning(message, *args)
