"""`kvroute serve-replica` under faults: a request the engine fails gets its own 500
and nothing else fails; a client that leaves mid-stream is no error."""

from __future__ import annotations

import http.client
import json
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.replicas.faults import MARK, PoisonedExecutor
from tests.replicas.serve_helpers import DEADLINE_S, serve_replica, tiny_config
from tests.replicas.test_serve_replica import fetch, post

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow
def test_a_poisoned_request_fails_alone_and_the_replica_stays_ready(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path)) as server:
        engine = server.process.engine
        poisoned = PoisonedExecutor(engine.executor)
        server.call(lambda: setattr(engine, "executor", poisoned))

        failed = post(server.url, "/v1/completions", {"prompt": [*MARK, 9, 9], "max_tokens": 4})
        ordinary = [
            post(server.url, "/v1/completions", {"prompt": f"ordinary {i}", "max_tokens": 4})
            for i in range(100)
        ]
        health = fetch(server.url + "/health")
        load = server.call(server.process.core.load)

    error = failed.json()["error"]
    assert (failed.status_code, error["type"], error["code"]) == (500, "InternalServerError", 500)
    assert error["message"].startswith("request cmpl-")
    assert error["message"].endswith("-0 failed in the engine")
    assert [r.status_code for r in ordinary] == [200] * 100
    assert [len(r.json()["choices"][0]["token_ids"] or "xxxx") for r in ordinary] == [4] * 100
    assert poisoned.faults == 1
    assert health.status_code == 200
    assert (load.running_seqs, load.waiting_seqs, load.kv_usage) == (0, 0, 0.0)


def test_a_client_that_leaves_mid_stream_is_a_debug_line_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="kvroute"),
        serve_replica(tiny_config(tmp_path, step_s=0.0005)) as server,
    ):
        body = {"prompt": "0123456789", "max_tokens": 1000, "stream": True}
        address = urlsplit(server.url)
        for _ in range(5):
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
            connection.request("POST", "/v1/completions", json.dumps(body))
            reply = connection.getresponse()
            assert reply.readline().startswith(b"data: ")
            connection.close()
        deadline = time.monotonic() + DEADLINE_S
        while server.call(lambda: server.process.core.in_flight) and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = server.call(lambda: server.process.core.in_flight)
    assert in_flight == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
