"""The paths a request can take to the engines: clients round-robin straight to them,
or one router in front of them (kvroute, vllm-router, sglang-router, or `relay`: a
bare aiohttp proxy, round-robin, relaying bytes, the floor of a Python router).

A path is named `ROUTER[:POLICY[:KEY=VALUE,...]]`: `direct`, `kvroute:kv_aware`,
`kvroute:kv_aware:load_poll_s=0.5` (any `router:` config key), `vllm-router:cache_aware`,
`vllm-router:kv_aware` (its KV-event policy, fed the engines' ZeroMQ events),
`sglang-router:cache_aware`.

Degraded modes are read from the router itself: vllm-router counts how it got each
request's tokens (`vllm_router_kv_routing_inputs_total{result}`; anything but
`render` means it fell back, e.g. `preparation_unavailable` when the render call
did not answer in time), and every router's warnings and errors in its log during a
run are counted with the row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvroute.benchmarks.engines import REPO, free_port
from kvroute.benchmarks.peers.fleet import Fleet
from kvroute.benchmarks.peers.procs import Launched

ROUTERS = ("direct", "relay", "kvroute", "vllm-router", "sglang-router")
INSTALL_PEERS = ".venv/bin/python -m pip install -e '.[peers]'"
READY_DEADLINE_S = 180.0
_WARNING = re.compile(r"\b(WARN|WARNING|ERROR|CRITICAL|Traceback)\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Spec:
    router: str
    policy: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.options.items())
        plain = self.router in ("direct", "relay")
        base = self.router if plain else f"{self.router} {self.policy}"
        return f"{base} ({extra})" if extra else base


def parse_spec(text: str) -> Spec:
    """`ROUTER[:POLICY[:KEY=VALUE,...]]`; values are YAML scalars (0.5, true, ...)."""
    router, _, rest = text.partition(":")
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r} in {text!r}; choose from {ROUTERS}")
    policy, _, options_text = rest.partition(":")
    if router in ("direct", "relay"):
        if rest:
            raise ValueError(f"`{router}` takes no policy: it round-robins over the engines")
        return Spec(router, "round_robin")
    options: dict[str, Any] = {}
    for item in filter(None, options_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad option {item!r} in {text!r}: write KEY=VALUE")
        options[key] = yaml.safe_load(value)
    if options and router != "kvroute":
        raise ValueError(f"options are kvroute `router:` config keys; {router} takes none")
    return Spec(router, policy or "cache_aware", options)


def missing_peers(specs: list[Spec]) -> list[str]:
    """The peer routers the specs name that are not installed here."""
    missing = []
    if any(s.router == "vllm-router" for s in specs) and _vllm_router_binary() is None:
        missing.append("vllm-router")
    wants_sglang = any(s.router == "sglang-router" for s in specs)
    if wants_sglang and importlib.util.find_spec("sglang_router") is None:
        missing.append("sglang-router")
    return missing


def _vllm_router_binary() -> str | None:
    beside = Path(sys.executable).parent / "vllm-router"
    return str(beside) if beside.exists() else shutil.which("vllm-router")


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _counters(text: str, name: str, label: str) -> dict[str, float]:
    """Samples of counter `name` by the value of `label`."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get(label, "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


class RouterPath:
    """One path under test: its process (None for `direct`), where to send request i,
    and what it says about itself between two checkpoints."""

    def __init__(self, spec: Spec, fleet: Fleet, workdir: Path) -> None:
        self.spec = spec
        self.fleet = fleet
        self.process: Launched | None = None
        self.url = ""
        self.metrics_url: str | None = None
        self._log_offset = 0
        self._inputs: dict[str, float] = {}
        if spec.router != "direct":
            self._launch(workdir)

    # ----------------------------------------------------------------- launch

    def _launch(self, workdir: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = workdir / f"{self.spec.label.replace(' ', '-').replace('/', '_')}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if self.spec.router == "kvroute":
            command = self._kvroute_command(workdir, port)
        elif self.spec.router == "vllm-router":
            command = self._vllm_router_command(port)
        elif self.spec.router == "relay":
            command = [sys.executable, "-m", "kvroute.benchmarks.peers.relay", "--port", str(port)]
            command += ["--engines", *self.fleet.urls]
        else:
            metrics_port = free_port()
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            command = [sys.executable, "-m", "sglang_router.launch_router"]
            command += ["--worker-urls", *self.fleet.urls, "--policy", self.spec.policy]
            command += ["--host", "127.0.0.1", "--port", str(port)]
            command += ["--prometheus-port", str(metrics_port)]
        self.process = Launched(command, log, env)

    def _kvroute_command(self, workdir: Path, port: int) -> list[str]:
        data = json.loads(json.dumps(self.fleet.config))
        data["replicas"]["count"] = 0
        data["cluster"] = {"address": None, "namespace": f"kvroute-peers-{port}"}
        data["router"] = {
            "policy": self.spec.policy,
            "http_host": "127.0.0.1",
            "http_port": port,
            **self.spec.options,
        }
        data["external"] = [engine.external_entry() for engine in self.fleet.engines]
        path = workdir / f"kvroute-{port}.yaml"
        path.write_text(yaml.safe_dump(data))
        return [sys.executable, "-m", "kvroute.router.app.cli", "up", str(path)]

    def _vllm_router_command(self, port: int) -> list[str]:
        binary = _vllm_router_binary()
        if binary is None:
            raise SystemExit(f"vllm-router is not installed: {INSTALL_PEERS}")
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        command = [binary, "--worker-urls", *self.fleet.urls, "--policy", self.spec.policy]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        command += ["--prometheus-port", str(metrics_port)]
        if self.spec.policy == "kv_aware":
            for engine in self.fleet.engines:
                entry = engine.external_entry()["events"]
                command += ["--kv-event-source", f"{engine.url}={entry['endpoint']}"]
                command += ["--kv-event-replay-source", f"{engine.url}={entry['replay_endpoint']}"]
            command += ["--kv-event-block-size", str(self.fleet.block_size)]
            command += ["--kv-event-model", self.fleet.model]
        return command

    def wait_ready(self) -> None:
        """Until the router answers /v1/models (each lists models once it has found
        its engines; sglang-router names them its own way)."""
        if self.process is None:
            return
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"{self.spec.label} exited:\n{self.process.tail()}")
            try:
                _get(f"{self.url}/v1/models")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.spec.label} was not ready within {READY_DEADLINE_S:g} s")

    def wait_index_cleared(self) -> None:
        """After the engines' caches were reset: until kvroute's index holds nothing
        (it has applied every engine's AllBlocksCleared, and the events the engines
        published while it was paused), so no run starts from a stale index."""
        if self.spec.router != "kvroute":
            return
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                if json.loads(_get(f"{self.url}/status")).get("index_entries") == 0:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.spec.label} still indexed blocks after the caches were reset")

    # ------------------------------------------------------------------- runs

    def target(self, i: int) -> str:
        """Where request i goes: the router, or engine i mod n for `direct`."""
        if self.process is None:
            urls = self.fleet.urls
            return urls[i % len(urls)]
        return self.url

    def checkpoint(self) -> None:
        """Mark the start of a run: what the router said so far is not this run's."""
        if self.process is not None:
            self._log_offset = self.process.log.stat().st_size
        self._inputs = self._routing_inputs()

    def _routing_inputs(self) -> dict[str, float]:
        if self.spec.router != "vllm-router" or self.metrics_url is None:
            return {}
        try:
            text = _get(self.metrics_url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return {}
        return _counters(text, "vllm_router_kv_routing_inputs_total", "result")

    def notes(self) -> tuple[dict[str, int], list[str]]:
        """What ran degraded since the checkpoint, counted by kind (tokens not from
        the engine's render endpoint, warning or error lines in the router's log),
        and the first such log line as a sample."""
        counts: dict[str, int] = {}
        after = self._routing_inputs()
        for result, total in after.items():
            grew = int(total - self._inputs.get(result, 0.0))
            if result != "render" and grew > 0:
                counts[f"routing tokens: {result}"] = grew
        samples: list[str] = []
        if self.process is not None:
            with self.process.log.open("rb") as log:
                log.seek(self._log_offset)
                text = _ANSI.sub("", log.read().decode(errors="replace"))
            warnings = [line for line in text.splitlines() if _WARNING.search(line)]
            if warnings:
                counts["log warnings"] = len(warnings)
                samples.append(warnings[0][:240])
        return counts, samples

    def pause(self) -> None:
        if self.process is not None:
            self.process.pause()

    def resume(self) -> None:
        if self.process is not None:
            self.process.resume()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
