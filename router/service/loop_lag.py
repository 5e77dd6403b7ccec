"""How late the router's own event loop runs: the measure that tells its stall from a
replica's.

A timer due every `interval_s` records how late it fired. A stall in progress has
no sample yet, so `max_since` also counts how overdue the next tick is now: a
caller woken by a timeout right after the loop was blocked sees the stall that
delayed it.

Invariants: samples are in time order; at most `window` are kept; lag is never
negative.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

INTERVAL_S = 0.1
WINDOW = 6000  # ten minutes of samples at INTERVAL_S


class LoopLag:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        observe: Callable[[float], None] | None = None,
        interval_s: float = INTERVAL_S,
        window: int = WINDOW,
    ) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self._observe = observe
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        self._due = loop.time() + interval_s
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        lag = max(0.0, now - self._due)
        self._samples.append((now, lag))
        if self._observe is not None:
            self._observe(lag)
        self._due = now + self.interval_s
        self._handle = self.loop.call_at(self._due, self._tick)

    def overdue(self) -> float:
        """How late the next tick already is: a stall in progress (0 if none)."""
        return max(0.0, self.loop.time() - self._due)

    def max_since(self, since: float) -> float:
        """The worst lag seen from loop time `since` until now, the stall in progress
        included."""
        worst = self.overdue()
        for at, lag in reversed(self._samples):
            if at < since:
                break
            worst = max(worst, lag)
        return worst

    def last(self) -> float:
        return self._samples[-1][1] if self._samples else 0.0

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the kept samples (0 before the first)."""
        if not self._samples:
            return 0.0
        ordered = sorted(lag for _, lag in self._samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float | int]:
        """What /status shows: the last lag, p50, p99 and max over the window."""
        return {
            "last_s": round(self.last(), 4),
            "p50_s": round(self.quantile(0.5), 4),
            "p99_s": round(self.quantile(0.99), 4),
            "max_s": round(max((lag for _, lag in self._samples), default=0.0), 4),
            "samples": len(self._samples),
        }

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
