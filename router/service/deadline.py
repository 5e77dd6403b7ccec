"""A request's deadline over many awaits, with one timer.

A streamed attempt awaits its engine once per token. `asyncio.timeout` around each
await pushes a timer onto the loop's heap and cancels it again for every token: a
fifth of the router's CPU per streamed token. A `Deadline` arms one timer per
attempt; at the deadline it cancels the task if it is waiting in `wait`, and
otherwise makes the next `wait` fail at once.

Invariants: `wait` raises TimeoutError, never CancelledError, for a cancellation
this deadline made; a cancellation from anyone else propagates unchanged; after
`close` the timer never fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """`when` is in `loop.time()`."""
        self.expired = False
        self._waiter: asyncio.Task[object] | None = None
        self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.expired = True
        if self._waiter is not None:
            self._waiter.cancel()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or TimeoutError once the deadline has passed (the
        awaitable is then cancelled: a coroutine never started is closed)."""
        if self.expired:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise TimeoutError
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._waiter = task
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._waiter = None

    def close(self) -> None:
        self._handle.cancel()
