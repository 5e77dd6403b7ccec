"""serve-replica with the torch executor, over CURVE, and as a real subprocess."""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from kvroute.events.curve import CurveKeyFileError, read_key_pair, write_key_pair
from kvroute.router.app.cli import main
from tests.replicas.serve_helpers import (
    DEADLINE_S,
    events_json,
    serve_replica,
    stored_hashes,
    tiny_config,
)
from tests.replicas.test_serve_replica import PROMPT, free_port, post

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def test_the_torch_executor_serves_and_caching_changes_no_greedy_token(tmp_path: Path) -> None:
    with serve_replica(tiny_config(tmp_path, executor="torch")) as server:
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        first = post(server.url, "/v1/completions", body).json()
        second = post(server.url, "/v1/completions", body).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 8
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    assert len(first["choices"][0]["token_ids"]) == 4


def test_keygen_writes_a_private_secret_and_its_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "replica.key"
    assert main(["keygen", str(path)]) == 0
    keys = read_key_pair(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Path(f"{path}.pub").read_text().strip() == keys.public_key
    assert keys.public_key in capsys.readouterr().out
    assert main(["keygen", str(path)]) == 2  # never overwrites
    path.chmod(0o644)
    with pytest.raises(CurveKeyFileError, match="chmod 600"):
        read_key_pair(path)


def test_curve_keys_from_files_let_the_allowed_router_read_events(tmp_path: Path) -> None:
    replica_key = write_key_pair(tmp_path / "replica.key")
    router = write_key_pair(tmp_path / "router.key")
    port = free_port()
    events = json.loads(events_json(port))
    events["endpoint"] = f"tcp://0.0.0.0:{port}"  # off loopback: allowed because of CURVE
    with serve_replica(
        tiny_config(tmp_path, seed="7"),
        json.dumps(events),
        curve_secret_key_file=str(tmp_path / "replica.key"),
        curve_client_keys_file=str(tmp_path / "router.key.pub"),
    ) as server:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.curve_secretkey = router.secret_key.encode()
        sub.curve_publickey = router.public_key.encode()
        sub.curve_serverkey = replica_key.public_key.encode()
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        try:
            time.sleep(0.3)
            post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
            _, hashes = stored_hashes(sub, 2)
        finally:
            sub.close(linger=0)
            ctx.term()
    assert len(hashes) == 2


def _read_line(stream: object, deadline: float) -> str:
    """One line of a subprocess's pipe, or fail at the deadline."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line in time; got {line!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            byte = os.read(fd, 1)
            assert byte, f"the process closed its output; got {line!r}"
            line += byte
    return line.decode()


@pytest.mark.slow
def test_serve_replica_as_a_subprocess_serves_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "kvroute.router.app.cli",
        "serve-replica",
        str(tiny_config(tmp_path)),
        "--port",
        "0",
        "--kv-events-config",
        events_json(port),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        lines = [_read_line(process.stderr, deadline) for _ in range(3)]
        assert lines[1].startswith(f"KV events: tcp://127.0.0.1:{port} ")
        url = lines[0].rsplit(" at ", 1)[1].strip()
        with urllib.request.urlopen(url + "/health", timeout=DEADLINE_S) as health:
            assert health.status == 200
        reply = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).json()
        assert reply["usage"]["completion_tokens"] == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=DEADLINE_S)
        assert process.stderr is not None
        process.stderr.close()
