"""How the service reaches one routed replica, shared by the service and its helpers.

Its own module so that the service's collaborators can name it without importing
the service (the router package has no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.router.core import Registration
from kvroute.router.engines.backends import EngineBackend


@dataclass
class ReplicaLink:
    """How the service reaches one replica: its registration and its backend.
    `node_id` is the Ray node of an actor replica (None for an external engine)."""

    registration: Registration
    backend: EngineBackend
    node_id: str | None = None

    @property
    def external(self) -> bool:
        return self.node_id is None
