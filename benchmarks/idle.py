"""What an idle router costs: its own CPU, and the CPU it makes idle engines spend.

Three `serve-replica` engines (simulated executor) idle first with no router, then
with `kvroute up` in front of them (external engines only, so the router runs
in-process, without Ray), and the CPU of each whole process tree is read from /proc
over the same window. Prints one table:

    python -m benchmarks.idle [--window 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from kvroute.benchmarks.engines import ENGINE_MODEL, Engine, free_port
from kvroute.benchmarks.peers.procs import Launched, cpu_seconds

ENGINES = 3


def idle_share(roots: list[list[int]], window_s: float) -> list[float]:
    """Each group of process trees' CPU over `window_s`, as a share of one core."""
    before = [cpu_seconds(group) for group in roots]
    time.sleep(window_s)
    return [(cpu_seconds(group) - b) / window_s for group, b in zip(roots, before, strict=True)]


def router_config(engines: list[Engine], port: int) -> dict:
    model = yaml.safe_load(ENGINE_MODEL)["model"]
    return {
        "model": model,
        "replicas": {"count": 0},
        "events": {"security": "none"},
        "router": {"http_port": port},
        "external": [engine.external_entry() for engine in engines],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured idle")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before measuring")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kvroute-idle-"))
    engine_config = work / "engine.yaml"
    engine_config.write_text(ENGINE_MODEL)
    engines = [Engine(f"engine-{i}", engine_config, str(i)) for i in range(ENGINES)]
    router: Launched | None = None
    phases = tqdm(total=4, desc="idle", unit="phase")
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_healthy()
        time.sleep(args.settle)
        phases.update()
        pids = [[e.process.pid] for e in engines if e.process is not None]
        alone = idle_share(pids, args.window)
        phases.update()
        config = work / "router.yaml"
        port = free_port()
        config.write_text(yaml.safe_dump(router_config(engines, port)))
        command = [sys.executable, "-m", "kvroute.router.app.cli", "up", str(config)]
        router = Launched(command, work / "router.log")
        time.sleep(args.settle)
        phases.update()
        behind = idle_share([[router.pid], *pids], args.window)
        phases.update()
    finally:
        phases.close()
        if router is not None:
            router.stop()
        for engine in engines:
            engine.stop()
    rows = [
        ("engines idle, no router (each)", alone),
        ("engines idle behind kvroute (each)", behind[1:]),
        ("kvroute router, whole process tree", behind[:1]),
    ]
    print(f"\nidle CPU over {args.window:g} s, share of one core")
    print(f"{'what':<38} {'values':>24}")
    for what, values in rows:
        print(f"{what:<38} {' '.join(f'{v:6.1%}' for v in values):>24}")
    print(json.dumps({what: values for what, values in rows}))


if __name__ == "__main__":
    main()
