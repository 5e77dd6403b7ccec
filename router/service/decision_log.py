"""What the router decided, for a person reading its log.

Every finished request is one DEBUG line. At INFO, one summary line at most every
`interval_s`, so `--log-level INFO` shows where traffic goes and how well it hits
without a line per request (a busy router finishes thousands a second).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class DecisionLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._since = clock()
        self._by_replica: Counter[str] = Counter()
        self._prompt_tokens = 0
        self._predicted_tokens = 0
        self._cached_tokens = 0

    def record(
        self, request_id: str, replica_id: str, prompt_tokens: int, predicted: int, cached: int
    ) -> None:
        """One finished request: routed to `replica_id`, `predicted` of its
        `prompt_tokens` expected cached, `cached` reported by the engine."""
        self.logger.debug(
            "request %s: %d prompt tokens on %s, predicted hit %d, engine hit %d",
            request_id,
            prompt_tokens,
            replica_id,
            predicted,
            cached,
        )
        self._by_replica[replica_id] += 1
        self._prompt_tokens += prompt_tokens
        self._predicted_tokens += predicted
        self._cached_tokens += cached
        now = self.clock()
        if now - self._since >= self.interval_s:
            self._summarize(now)

    def _summarize(self, now: float) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            spread = ", ".join(f"{rid} {n}" for rid, n in sorted(self._by_replica.items()))
            prompt = max(1, self._prompt_tokens)
            self.logger.info(
                "routed %d requests in %.1f s (%s); %d prompt tokens, predicted hit %.1f%%, "
                "engine hit %.1f%%",
                sum(self._by_replica.values()),
                now - self._since,
                spread,
                self._prompt_tokens,
                100 * self._predicted_tokens / prompt,
                100 * self._cached_tokens / prompt,
            )
        self._since = now
        self._by_replica.clear()
        self._prompt_tokens = self._predicted_tokens = self._cached_tokens = 0
