"""When the router probes its external engines: at the configured rates while it
serves, rarely once it has been quiet.

An idle engine's `/metrics` and `/health` answers change only with traffic that is
not this router's, and each answer costs the engine a render: vLLM's `/metrics` is
50 KB of histograms. Probing every second while nothing happens cost each engine
about a point of a core more than having no router in front of it. A probe skipped
while quiet loses nothing the router needs: the first request after a quiet spell
reaches a dead engine as a refused connection, which is retried elsewhere, and
probing resumes at full rate as soon as a request is in flight.
"""

from __future__ import annotations


class ProbeGate:
    """`due(probe, now)`: whether a periodic probe runs this time. Always while a
    request is in flight or one ended within `quiet_every_s`; otherwise once per
    `quiet_every_s` for each probe. Times are the caller's clock, in seconds."""

    def __init__(self, quiet_every_s: float) -> None:
        self.quiet_every_s = quiet_every_s
        self._in_flight = 0
        self._active_at = float("-inf")
        self._last: dict[str, float] = {}

    def begin(self, now: float) -> None:
        """A request started."""
        self._in_flight += 1
        self._active_at = now

    def end(self, now: float) -> None:
        """A request ended (finished, failed or abandoned)."""
        self._in_flight -= 1
        self._active_at = now

    def quiet(self, now: float) -> bool:
        return self._in_flight == 0 and now - self._active_at >= self.quiet_every_s

    def due(self, probe: str, now: float) -> bool:
        if self.quiet(now) and now - self._last.get(probe, float("-inf")) < self.quiet_every_s:
            return False
        self._last[probe] = now
        return True
