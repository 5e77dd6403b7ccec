"""Several async streams read as one: what a request of several prompts or choices
yields, in the order its parts produce it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


async def interleave(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Every stream's items as they come. The first failure is raised. On any exit
    (done, failed, or the consumer leaving) every stream's task is cancelled and
    awaited, so each has closed its stream, and aborted its request, before this
    returns. A single stream is read in place: no task and no queue hop per item,
    which is most of what relaying one streamed choice costs."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(_Failed(exc))
        finally:
            await queue.put(_DONE)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    running = len(tasks)
    try:
        while running:
            item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, _Failed):
                raise item.error
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
