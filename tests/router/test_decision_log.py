"""The decision log: a DEBUG line per request, one INFO summary per interval."""

from __future__ import annotations

import logging

import pytest

from kvroute.router.service.decision_log import DecisionLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_info_shows_one_summary_per_interval_and_debug_every_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = DecisionLog(logging.getLogger("kvroute.test.decisions"), interval_s=10.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger="kvroute.test.decisions")
    log.record("r1", "engine-a", 100, 80, 80)
    clock.now = 4.0
    log.record("r2", "engine-b", 100, 0, 16)
    clock.now = 10.0
    log.record("r3", "engine-a", 200, 100, 100)
    clock.now = 12.0
    log.record("r4", "engine-a", 100, 0, 0)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert infos == [
        "routed 3 requests in 10.0 s (engine-a 2, engine-b 1); 400 prompt tokens, "
        "predicted hit 45.0%, engine hit 49.0%"
    ]
    assert debugs[0] == "request r1: 100 prompt tokens on engine-a, predicted hit 80, engine hit 80"
    assert len(debugs) == 4
