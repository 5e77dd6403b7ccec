"""Run every path through every workload, alternating, and print one table.

Per engine layout: start the engines, start every router once and pause it
(SIGSTOP of its whole tree, so an idle router neither burns CPU nor polls the
engines while another path runs). Then, round after round (each round in a rotated
path order) and workload after workload, for each path: resume it, reset the
engines' prefix caches, let it settle, measure its idle CPU and the engines' (the
router's polling shows up there), run the workload, read the engines' counters,
pause it again.

Run: python -m benchmarks.peers [--quick] [--routers direct kvroute:kv_aware ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvroute.benchmarks.peers import procs, report
from kvroute.benchmarks.peers.client import run_workload
from kvroute.benchmarks.peers.fleet import ENGINE_KINDS, ENGINE_TOKENS, Fleet, start_fleet
from kvroute.benchmarks.peers.routers import (
    INSTALL_PEERS,
    RouterPath,
    Spec,
    missing_peers,
    parse_spec,
)
from kvroute.benchmarks.peers.workloads import GENERATORS, LAYOUTS, Scale, Workload, build
from kvroute.benchmarks.vllm_launch import vllm_version

RESULTS = Path(__file__).resolve().parents[1] / "results" / "peers"
DEFAULT_ROUTERS = [
    "direct",
    "kvroute:kv_aware",
    "vllm-router:cache_aware",
    "vllm-router:round_robin",
    "vllm-router:kv_aware",
    "sglang-router:cache_aware",
]


def scrape(fleet: Fleet) -> list[report.EngineCounters]:
    out = []
    for url in fleet.urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            out.append(report.engine_counters(response.read().decode()))
    return out


def _mean_ttft(
    before: list[report.EngineCounters], after: list[report.EngineCounters]
) -> float | None:
    """The engines' own mean TTFT between two scrapes; None if they count none."""
    count = sum(a.ttft_count - b.ttft_count for a, b in zip(after, before, strict=True))
    total = sum(a.ttft_sum - b.ttft_sum for a, b in zip(after, before, strict=True))
    return total / count if count else None


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def measure_once(
    path: RouterPath,
    fleet: Fleet,
    workload: Workload,
    round_: int,
    args: argparse.Namespace,
) -> report.Run:
    router = [path.process.pid] if path.process is not None else []
    path.resume()
    try:
        fleet.reset_prefix_caches()
        path.wait_index_cleared()
        time.sleep(args.settle)
        r0, e0, t0 = procs.cpu_seconds(router), procs.cpu_seconds(fleet.pids), time.monotonic()
        time.sleep(args.idle)
        r1, e1, t1 = procs.cpu_seconds(router), procs.cpu_seconds(fleet.pids), time.monotonic()
        before = scrape(fleet)
        path.checkpoint()
        c0, started = procs.cpu_seconds(router), time.monotonic()
        outcomes = asyncio.run(run_workload(workload, fleet.model, path.target, args.concurrency))
        seconds = time.monotonic() - started
        c1 = procs.cpu_seconds(router)
        after = scrape(fleet)
        notes, samples = path.notes()
    finally:
        path.pause()
    ok = [o for o in outcomes if o.ok]
    for failed in (o for o in outcomes if not o.ok):
        kind = f"failed: {failed.error}"
        notes[kind] = notes.get(kind, 0) + 1
    return report.Run(
        workload=workload.name,
        path=path.spec.label,
        round=round_,
        ok=len(ok),
        failed=len(outcomes) - len(ok),
        seconds=seconds,
        ttfts=[o.ttft_s for o in ok],
        e2es=[o.e2e_s for o in ok],
        hits=sum(a.hits - b.hits for a, b in zip(after, before, strict=True)),
        queries=sum(a.queries - b.queries for a, b in zip(after, before, strict=True)),
        per_engine=[a.requests - b.requests for a, b in zip(after, before, strict=True)],
        router_cpu_s=c1 - c0,
        router_idle=(r1 - r0) / (t1 - t0),
        engines_idle=(e1 - e0) / (t1 - t0),
        notes=notes,
        samples=samples,
        engine_ttft_s=_mean_ttft(before, after),
    )


@contextmanager
def routers_for(specs: list[Spec], fleet: Fleet, workdir: Path) -> Iterator[list[RouterPath]]:
    """Every path, started, ready and paused; all stopped on the way out."""
    paths: list[RouterPath] = []
    try:
        for spec in specs:
            paths.append(RouterPath(spec, fleet, workdir))
        for path in paths:
            path.wait_ready()
            path.pause()
        yield paths
    finally:
        for path in paths:
            path.stop()


def run(args: argparse.Namespace, workloads: list[Workload], specs: list[Spec]) -> list[report.Run]:
    workdir = Path(tempfile.mkdtemp(prefix="kvroute-peers-"))
    print(f"logs and configs: {workdir}", file=sys.stderr)
    runs: list[report.Run] = []
    total = args.rounds * len(workloads) * len(specs)
    with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as bar:
        for layout in LAYOUTS:
            mine = [w for w in workloads if w.layout == layout]
            if not mine:
                continue
            fleet = start_fleet(
                args.engines,
                layout,
                args.engine_count,
                args.executor,
                workdir,
                args.python,
                pin=args.pin_engines,
            )
            try:
                with routers_for(specs, fleet, workdir) as paths:
                    for round_ in range(args.rounds):
                        shift = round_ % len(paths)
                        order = paths[shift:] + paths[:shift]
                        for workload in mine:
                            for path in order:
                                bar.set_postfix_str(f"{workload.name} {path.spec.label}")
                                runs.append(measure_once(path, fleet, workload, round_, args))
                                bar.update()
            finally:
                fleet.stop()
    return runs


def default_workloads(quick: bool) -> list[str]:
    return ["tenants", "pressure", "hybrid"] if quick else list(GENERATORS)


def full_attention_only(workloads: list[Workload], explicit: bool) -> list[Workload]:
    """The workloads vLLM's engines can run (`TinyLlama` is full attention): a
    default list loses its hybrid ones, an explicit request for one is an error."""
    hybrid = [w.name for w in workloads if w.layout != "full"]
    if hybrid and explicit:
        raise ValueError(f"--engines vllm runs full attention only; drop {', '.join(hybrid)}")
    return [w for w in workloads if w.layout == "full"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, 2 rounds")
    parser.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS)
    parser.add_argument(
        "--workloads",
        nargs="+",
        help=f"of {', '.join(GENERATORS)} (default: all; --quick: tenants pressure hybrid; "
        "--engines vllm leaves out the hybrid layout)",
    )
    parser.add_argument("--engines", choices=ENGINE_KINDS, default="serve-replica")
    parser.add_argument(
        "--executor",
        choices=("torch", "simulated"),
        default="torch",
        help="serve-replica's executor (not used with --engines vllm)",
    )
    parser.add_argument(
        "--python",
        default=".venv-vllm/bin/python",
        help="with --engines vllm: the Python of vLLM's venv (`make vllm-e2e` builds it)",
    )
    parser.add_argument("--engine-count", type=int, default=3, help="engines (default 3)")
    parser.add_argument(
        "--pin-engines",
        action="store_true",
        help="run engine i on core i alone, as engines with an accelerator each do not "
        "slow each other down (at most one engine per core)",
    )
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help=f"write results here (e.g. {RESULTS})")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or 2
    args.settle = 0.5 if args.quick else 1.0
    args.idle = 1.5 if args.quick else 3.0
    scale = (
        Scale(requests=24, sessions=6, engine_tokens=ENGINE_TOKENS, engines=args.engine_count)
        if args.quick
        else Scale(requests=48, sessions=12, engine_tokens=ENGINE_TOKENS, engines=args.engine_count)
    )
    try:
        specs = [parse_spec(s) for s in args.routers]
        workloads = build(args.workloads or default_workloads(args.quick), scale, args.seed)
        if args.engines == "vllm":
            workloads = full_attention_only(workloads, explicit=args.workloads is not None)
    except ValueError as exc:
        parser.error(str(exc))
    missing = missing_peers(specs)
    if missing:
        names = " and ".join(missing)
        raise SystemExit(f"{names} not installed; install the peers: {INSTALL_PEERS}")

    count = args.engine_count
    engines = f"{count} x {args.engines} ({args.executor} executor)"
    if args.engines == "vllm":
        engines = f"{count} x vLLM {vllm_version(args.python)} (tiny random Llama, byte tokens)"
    if args.pin_engines:
        engines += ", each pinned to a core of its own"
    load_before, busy_before = os.getloadavg(), _busy_ticks()
    started = time.monotonic()
    runs = run(args, workloads, specs)
    busy_after = _busy_ticks()
    meta: dict[str, Any] = {
        "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        "cores": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine_busy": round(
            (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]), 3
        ),
        "engines": engines,
        "workloads": {w.name: w.about for w in workloads},
        "requests": {w.name: w.requests for w in workloads},
        "bounds": {w.name: round(w.bound(), 4) for w in workloads},
        "rounds": args.rounds,
        "concurrency": args.concurrency,
    }
    rows = report.summarize(runs)
    text = (
        f"`{meta['command']}` on {meta['cores']} cores, {meta['engines']}, "
        f"{args.rounds} rounds, {args.concurrency} sessions in flight; "
        f"machine {meta['machine_busy']:.0%} busy over the run, load average "
        f"{meta['loadavg_before'][0]} -> {meta['loadavg_after'][0]}; "
        f"{meta['wall_s']:.0f} s\n\n"
        + report.table(rows)
        + "\n\nkvroute against the best clean peer (highest hit rate):\n\n"
        + report.verdicts(rows, meta["bounds"])
        + "\n\nWorkloads:\n\n"
        + "\n".join(f"- {w.name} ({w.requests} requests): {w.about}" for w in workloads)
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "peers.md").write_text("# Routers side by side\n\n" + text + "\n")
        (args.out / "peers.json").write_text(
            json.dumps(report.as_json(runs, rows, meta), indent=1) + "\n"
        )
        report.plot(rows, args.out / "peers.png")


if __name__ == "__main__":
    main()
