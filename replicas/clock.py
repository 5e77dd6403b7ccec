"""Clocks for the engine: wall time inside Ray actors, virtual time in the simulator.

The engine never reads time any other way, so the same scheduling code runs in
both worlds.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class RealClock:
    """Monotonic wall time, in seconds."""

    def now(self) -> float:
        return time.monotonic()


class VirtualClock:
    """Time that moves only when the simulator advances it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"virtual time cannot go back from {self._now} to {t}")
        self._now = t
