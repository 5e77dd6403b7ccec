"""`Deadline`: one timer over many awaits; TimeoutError for its own cancellation,
anyone else's cancellation unchanged."""

from __future__ import annotations

import asyncio

import pytest

from kvroute.router.service.deadline import Deadline

pytestmark = pytest.mark.timeout(30)


def test_results_arrive_unchanged_before_the_deadline() -> None:
    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, loop.time() + 10.0)
        try:
            return [await deadline.wait(asyncio.sleep(0.001, result=i)) for i in range(3)]
        finally:
            deadline.close()

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_an_await_that_outlasts_the_deadline_is_cancelled_and_times_out() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10.0)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, loop.time() + 0.05)
        with pytest.raises(TimeoutError):
            await deadline.wait(slow())
        assert cancelled.is_set() and deadline.expired
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_a_deadline_that_passed_between_awaits_fails_the_next_one_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, loop.time() + 0.01)
        await asyncio.sleep(0.05)  # not waiting on the deadline when it passes
        never_started = asyncio.sleep(10.0)
        with pytest.raises(TimeoutError):
            await deadline.wait(never_started)
        assert never_started.cr_frame is None  # closed, not left unawaited

    asyncio.run(scenario())


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline() -> None:
    async def waiter(deadline: Deadline) -> None:
        await deadline.wait(asyncio.sleep(10.0))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, loop.time() + 10.0)
        task = asyncio.ensure_future(waiter(deadline))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline.close()

    asyncio.run(scenario())


def test_a_closed_deadline_never_fires() -> None:
    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, loop.time() + 0.01)
        deadline.close()
        await asyncio.sleep(0.05)
        return deadline.expired

    assert asyncio.run(scenario()) is False
