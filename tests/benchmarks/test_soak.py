"""A short soak (60 s) of the router under stolen CPU, a frozen and a killed engine:
nothing lost, nothing hung past its deadline, no 503 while engines live (a stream cut
by the killed engine after its first tokens is counted apart, as `cut`)."""

from __future__ import annotations

import pytest

from kvroute.benchmarks.soak import soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_short_soak_loses_nothing_hangs_nothing_and_never_answers_503() -> None:
    result = soak(60.0)
    assert (result["lost"], result["hung"], result["503"]) == (0, 0, 0)
    assert result["ok"] > 0
    assert result["huge_status"] == 400
    # The frozen engine came back and was never dropped while its process lived.
    assert {"engine-0", "engine-1"} <= set(result["replicas_after"])
