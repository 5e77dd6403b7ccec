"""CLI start-up time: `kvroute --help`, `submit` and `status`, each a fresh process.

`submit` and `status` go to a port where nothing listens, so each run measures the
start-up, argument parsing and one refused connection, which is the whole fixed cost
of the command; the target is under 0.5 s. The table also says whether the command
imported torch, numba or ray, which are what made the CLI slow before (about 5.7 s).

    python -m benchmarks.startup [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

HEAVY = ("torch", "numba", "ray")
UNUSED_URL = "http://127.0.0.1:9"
COMMANDS = {
    "--help": ["--help"],
    "submit": ["submit", "hello", "--url", UNUSED_URL],
    "status": ["status", "--url", UNUSED_URL],
}
# Runs the CLI in this interpreter, then reports which heavy modules it loaded.
PROBE = (
    "import sys\n"
    "from kvroute.router.app.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def time_command(args: list[str]) -> tuple[float, str]:
    """Wall seconds of one fresh `kvroute ARGS` process, and the heavy modules it loaded."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - started
    heavy = [line for line in done.stderr.splitlines() if line.startswith("heavy:")]
    if not heavy:
        raise RuntimeError(f"kvroute {' '.join(args)} failed: {done.stderr[-500:]}")
    return elapsed, heavy[-1].removeprefix("heavy:")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    baseline = [time_command_plain() for _ in range(args.runs)]
    rows = []
    for name, command in tqdm(COMMANDS.items(), desc="commands", unit="cmd"):
        samples = [time_command(command) for _ in range(args.runs)]
        times = [t for t, _ in samples]
        rows.append((name, statistics.median(times), max(times), samples[-1][1] or "none"))
    python = statistics.median(baseline)
    print(f"\nkvroute CLI start-up, median of {args.runs} fresh processes\n")
    print("| command | median s | max s | vs bare python | heavy modules loaded |")
    print("|---|---|---|---|---|")
    for name, median, worst, heavy in rows:
        print(
            f"| `kvroute {name}` | {median:.3f} | {worst:.3f} | {median / python:.1f}x | {heavy} |"
        )
    print(f"| bare `python -c pass` | {python:.3f} | {max(baseline):.3f} | 1.0x | none |")
    slow = [name for name, median, _, _ in rows if median >= 0.5]
    print("\ntarget < 0.5 s: " + ("met" if not slow else f"missed by {', '.join(slow)}"))
    return 0


def time_command_plain() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
