"""What an idle router costs: its own CPU, and the CPU it makes idle engines spend.

Default: three `serve-replica` engines (simulated executor) idle first with no router,
then with `kvroute up` in front of them (external engines only, so the router runs
in-process, without Ray), and the CPU of each whole process tree is read from /proc
over the same window.

`--ray`: kvroute's own deployment (configs/default.yaml on the simulated executor, its
replica actors and router actor on an embedded Ray), idle; the CPU of the router actor
and of each replica actor, and per second the `load()` calls each replica answers and
the loads it pushes on its event socket.

Each prints one table:

    python -m benchmarks.idle [--window 30]
    python -m benchmarks.idle --ray [--window 30] [--load-poll-s S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from kvroute.benchmarks.engines import ENGINE_MODEL, Engine, free_port
from kvroute.benchmarks.peers.procs import Launched, cpu_seconds, tree

ENGINES = 3
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


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


def print_table(title: str, rows: list[tuple[str, list[float]]], fmt: str = "6.1%") -> None:
    print(f"\n{title}")
    print(f"{'what':<38} {'values':>24}")
    for what, values in rows:
        print(f"{what:<38} {' '.join(format(v, fmt) for v in values):>24}")
    print(json.dumps({what: values for what, values in rows}))


def _actor_pids(title: str) -> list[int]:
    """Processes under this one (the embedded Ray's workers) whose title is `title`."""
    found = []
    for pid in tree(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if cmdline.startswith(title.encode()):
            found.append(pid)
    return found


def ray_idle(window_s: float, settle_s: float, load_poll_s: float | None) -> None:
    """kvroute's own replicas and router on an embedded Ray, idle."""
    import msgspec
    import ray

    from kvroute.router.app.launch import cluster_keys, init_ray, start_replica, start_router
    from kvroute.router.config import load_config

    config = load_config(DEFAULT_CONFIG)
    router_options: dict[str, float | int] = {"http_port": 0}
    if load_poll_s is not None:
        router_options["load_poll_s"] = load_poll_s
    config = msgspec.structs.replace(
        config,
        router=msgspec.structs.replace(config.router, **router_options),
        replicas=msgspec.structs.replace(config.replicas, executor="simulated"),
    )
    keys = cluster_keys(config)
    init_ray(config)
    try:
        router, _ = start_router(config, curve=keys)
        public = keys.public_key if keys is not None else None
        replicas = [start_replica(config, i, public) for i in range(config.replicas.count)]
        ray.get(router.wait_for_replicas.remote(len(replicas)), timeout=120)
        time.sleep(settle_s)
        (router_pid,) = _actor_pids("ray::RouterService")
        health = ray.get([r.health.remote() for r in replicas], timeout=30)
        pids = [[h["pid"]] for h in health]
        shares = idle_share([[router_pid], *pids], window_s)
        after = ray.get([r.health.remote() for r in replicas], timeout=30)
    finally:
        ray.shutdown()

    def rate(key: str) -> list[float]:
        """Per replica, `key` of its health counted per second over the window."""
        pairs = zip(health, after, strict=True)
        return [(a.get(key, 0) - h.get(key, 0)) / window_s for h, a in pairs]

    poll = config.router.load_poll_s
    print_table(
        f"idle CPU over {window_s:g} s, share of one core (load_poll_s {poll:g})",
        [("router actor", shares[:1]), ("replica actors (each)", shares[1:])],
    )
    print_table(
        "per replica, per second",
        [
            ("load() calls (each)", rate("load_calls")),
            ("loads pushed (each)", rate("loads_pushed")),
        ],
        "6.1f",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured idle")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before measuring")
    parser.add_argument("--ray", action="store_true", help="kvroute's own Ray replicas")
    parser.add_argument("--load-poll-s", type=float, help="with --ray: router.load_poll_s")
    args = parser.parse_args(argv)
    if args.ray:
        ray_idle(args.window, args.settle, args.load_poll_s)
        return
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
    print_table(f"idle CPU over {args.window:g} s, share of one core", rows)


if __name__ == "__main__":
    main()
