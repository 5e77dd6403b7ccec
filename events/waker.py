"""A self-pipe that wakes a thread blocked in `zmq.Poller.poll` from any other thread."""

from __future__ import annotations

import contextlib
import socket

_DRAIN_READS = 64


class Waker:
    """`wake()` is safe from any thread and never blocks; wakes coalesce until `drain()`."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake is already pending
            self._writer.send(b"\0")

    def drain(self) -> None:
        """Consume pending wakes; a bounded number of reads empties the pipe."""
        with contextlib.suppress(BlockingIOError):
            for _ in range(_DRAIN_READS):
                self._reader.recv(4096)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
