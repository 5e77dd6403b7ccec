"""An embedded Ray listens on loopback only: no GCS, raylet, worker, agent or dashboard
port is reachable from another host.

Ray resolves a node address of 127.0.0.1 to the host's routable one (ray/_private/
services.py, resolve_ip_for_localhost and get_node_ip_address) unless clusters are
disabled (ray_constants.ENABLE_RAY_CLUSTER, its macOS/Windows mode); with the node
address 127.0.0.1, every server it starts binds loopback. The child process starts Ray
that way, in a process of its own so the session's Ray is left alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Starts the embedded Ray with kvroute's own `init_ray`, runs one actor (a worker),
# then samples every TCP listener of its process tree for a few seconds (the
# dashboard and the monitor start theirs late) and prints them as JSON lines.
CHILD = """
import json, os, time
import ray
import psutil  # vendored by Ray
from kvroute.router.config import parse_config
from kvroute.router.app.launch import init_ray

assert init_ray(parse_config({"cluster": {"num_cpus": 1}}))

@ray.remote
class Worker:
    def pid(self):
        return os.getpid()

ray.get(Worker.remote().pid.remote(), timeout=120)
seen = set()
for _ in range(12):
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    seen.add((process.pid, name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue  # a process that exited between the listing and the look
    time.sleep(0.5)
ray.shutdown()
for pid, name, ip, port in sorted(seen):
    print(json.dumps({"pid": pid, "name": name, "ip": ip, "port": port}))
"""


REPO = Path(__file__).resolve().parents[2]


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@pytest.mark.slow
@pytest.mark.ray
def test_every_listener_of_an_embedded_ray_is_on_loopback() -> None:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "PYTHONPATH": str(REPO),
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    listeners = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    # GCS, raylet, driver, worker and agents: the sampling saw Ray's processes.
    assert len({listener["pid"] for listener in listeners}) >= 4, listeners
    exposed = [listener for listener in listeners if not _loopback(listener["ip"])]
    assert not exposed, exposed
