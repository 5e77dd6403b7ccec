"""Processes the harness starts: each in its own session, its whole tree's CPU read
from /proc, paused while another path runs, and gone when the harness ends.

A router is more than one process (kvroute's Ray starts a GCS, a raylet and
workers), so CPU is summed over every live descendant of the launched process,
and stopping signals the session's group and then every descendant seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEADLINE_S = 30.0
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    parent: int
    cpu_s: float  # user + system
    started: int  # clock ticks after boot: with the pid, names one process for good


def _stat(pid: int) -> Stat | None:
    """The process's /proc/PID/stat; None once it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return Stat(int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS, int(fields[19]))


def tree(root: int) -> list[int]:
    """`root` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(stat.parent, []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        if _stat(pid) is not None:
            found.append(pid)
        frontier.extend(children.get(pid, []))
    return found


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds used so far by the trees under `roots` (live processes only)."""
    total = 0.0
    for root in roots:
        for pid in tree(root):
            stat = _stat(pid)
            if stat is not None:
                total += stat.cpu_s
    return total


class Launched:
    """One command in its own session, output to `log`."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid = self.process.pid
        self._known: dict[int, int] = {}  # pid -> start time, of every descendant seen

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def _remember(self) -> list[int]:
        pids = tree(self.pid) if self.alive() else []
        for pid in pids:
            stat = _stat(pid)
            if stat is not None:
                self._known[pid] = stat.started
        return pids

    def _same(self, pid: int) -> bool:
        """`pid` is still the process seen under this tree, not a reuse of its number."""
        stat = _stat(pid)
        return stat is not None and stat.started == self._known.get(pid)

    def _signal_tree(self, signum: int) -> None:
        for pid in self._remember():
            _kill(pid, signum)

    def pause(self) -> None:
        """SIGSTOP the whole tree: a paused router spends no CPU and polls nothing."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM the group (then SIGKILL at the deadline) and every descendant
        ever seen, so nothing outlives the harness."""
        self._remember()
        _kill(self.pid, signal.SIGCONT, group=True)
        _kill(self.pid, signal.SIGTERM, group=True)
        try:
            self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            _kill(self.pid, signal.SIGKILL, group=True)
            self.process.wait(timeout=DEADLINE_S)
        left = [p for p in self._known if p != self.pid and self._same(p)]
        for pid in left:
            _kill(pid, signal.SIGCONT)
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DEADLINE_S
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if self._same(p)]
        for pid in left:
            _kill(pid, signal.SIGKILL)


def _kill(pid: int, signum: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
