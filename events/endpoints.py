"""Endpoint rules shared by publisher and subscriber.

Our defaults bind 127.0.0.1; any other address must be named in config. A tcp
port of `*` asks the OS for a free port, which `bound_endpoint` reads back.
"""

from __future__ import annotations

import ipaddress

import zmq

LOCAL_SCHEMES = ("ipc://", "inproc://")


def offset_endpoint(endpoint: str, data_parallel_rank: int) -> str:
    """vLLM's per-rank endpoint: tcp port + rank, or a `_dp{rank}` suffix for ipc/inproc.

    Rank 0 and ephemeral (`*`) ports are returned unchanged.
    """
    if data_parallel_rank < 0:
        raise ValueError(f"negative data parallel rank {data_parallel_rank}")
    if data_parallel_rank == 0:
        return endpoint
    if endpoint.startswith(LOCAL_SCHEMES):
        return f"{endpoint}_dp{data_parallel_rank}"
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"unsupported endpoint {endpoint!r}: use tcp://, ipc:// or inproc://")
    base, sep, port = endpoint.rpartition(":")
    if not sep or base == "tcp":
        raise ValueError(f"tcp endpoint without a port: {endpoint!r}")
    if port == "*":
        return endpoint
    new_port = int(port) + data_parallel_rank
    if new_port > 65_535:
        raise ValueError(f"{endpoint!r} offset by rank {data_parallel_rank} exceeds port 65535")
    return f"{base}:{new_port}"


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint a socket actually bound, with any `*` port resolved."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc and for tcp on a loopback address (the host may be a name)."""
    if endpoint.startswith(LOCAL_SCHEMES):
        return True
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
