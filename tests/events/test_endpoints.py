"""Endpoint rules: vLLM's data-parallel offsets and the loopback check."""

from __future__ import annotations

import pytest

from kvroute.events.endpoints import is_loopback, offset_endpoint


@pytest.mark.parametrize(
    ("endpoint", "rank", "expected"),
    [
        ("tcp://127.0.0.1:5557", 0, "tcp://127.0.0.1:5557"),
        ("tcp://127.0.0.1:5557", 3, "tcp://127.0.0.1:5560"),
        ("tcp://*:5557", 1, "tcp://*:5558"),
        ("tcp://[::1]:5557", 2, "tcp://[::1]:5559"),
        ("tcp://127.0.0.1:*", 4, "tcp://127.0.0.1:*"),
        ("ipc:///tmp/kv-events", 2, "ipc:///tmp/kv-events_dp2"),
        ("inproc://cache", 1, "inproc://cache_dp1"),
    ],
)
def test_endpoints_are_offset_by_data_parallel_rank(
    endpoint: str, rank: int, expected: str
) -> None:
    assert offset_endpoint(endpoint, rank) == expected


@pytest.mark.parametrize(
    ("endpoint", "rank", "message"),
    [
        (
            "tcp://127.0.0.1:65535",
            1,
            r"^'tcp://127.0.0.1:65535' offset by rank 1 exceeds port 65535$",
        ),
        ("tcp://127.0.0.1", 1, r"^tcp endpoint without a port: 'tcp://127.0.0.1'$"),
        ("tcp://*", 2, r"^tcp endpoint without a port: 'tcp://\*'$"),
        (
            "udp://127.0.0.1:5557",
            1,
            r"^unsupported endpoint 'udp://127.0.0.1:5557': use tcp://, ipc:// or inproc://$",
        ),
        ("tcp://127.0.0.1:5557", -1, r"^negative data parallel rank -1$"),
    ],
    ids=["port-overflow", "no-port", "no-port-wildcard-host", "scheme", "negative-rank"],
)
def test_impossible_offsets_are_refused(endpoint: str, rank: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        offset_endpoint(endpoint, rank)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://127.0.0.2:5557", True),
        ("tcp://[::1]:5557", True),
        ("tcp://localhost:5557", True),
        ("ipc:///tmp/x", True),
        ("tcp://*:5557", False),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://10.0.0.5:5557", False),
        ("tcp://replica-3:5557", False),
    ],
)
def test_loopback_endpoints_are_recognised(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback
