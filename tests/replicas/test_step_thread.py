"""A step on the step thread: the loop stays free while it computes, admissions wait
for it to end, and an abort made meanwhile is applied once it has."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvroute.replicas.api import GenerateRequest, RequestAbortedError, SamplingOptions
from kvroute.replicas.clock import RealClock
from kvroute.replicas.executor import Executor, ScheduledRequest, StepOutput, StepShape
from kvroute.replicas.factory import build_engine
from kvroute.replicas.serving import ReplicaCore
from kvroute.router.config import load_config
from tests.replicas.serve_helpers import tiny_config

DEADLINE_S = 30.0


class GatedExecutor:
    """A real executor whose steps wait until the test opens the gate."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.measures_time = inner.measures_time
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.threads: set[str] = set()

    def execute(self, batch: Sequence[ScheduledRequest], shape: StepShape) -> StepOutput:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if not self.gate.wait(DEADLINE_S):
            raise RuntimeError("the test never opened the gate")
        return self.inner.execute(batch, shape)

    def forget(self, request_id: str) -> None:
        self.inner.forget(request_id)


def _request(request_id: str, first: int) -> GenerateRequest:
    return GenerateRequest(
        request_id, [first, 2, 3, 4, 5, 6], max_tokens=3, sampling=SamplingOptions()
    )


@pytest.mark.timeout(60)
def test_while_a_step_computes_the_loop_answers_admissions_wait_and_aborts_queue(
    tmp_path: Path,
) -> None:
    settings = load_config(tiny_config(tmp_path)).replica_settings()
    engine = build_engine(settings, RealClock())
    gated = GatedExecutor(engine.executor)
    engine.executor = gated
    core = ReplicaCore("replica-0", engine, step_in_thread=True)

    async def scenario() -> tuple[list[object], dict[str, object]]:
        core.start(None)
        first = asyncio.create_task(core.generate(_request("a", 1)))
        assert await asyncio.to_thread(gated.entered.wait, DEADLINE_S)
        # The step is blocked on its thread; the loop is not.
        seen: dict[str, object] = {"load": core.load(), "slept": False}
        await asyncio.sleep(0.05)
        seen["slept"] = True
        second = asyncio.create_task(core.generate(_request("b", 9)))
        await asyncio.sleep(0.05)
        seen["b admitted during the step"] = any(
            t.request.request_id == "b" for t in (*engine.waiting, *engine.running)
        )
        seen["abort a"] = core.abort("a")
        seen["a still in the engine"] = any(
            t.request.request_id == "a" for t in (*engine.waiting, *engine.running)
        )
        seen["reset refused"] = core.reset_prefix_cache() is False
        gated.gate.set()
        results = await asyncio.wait_for(
            asyncio.gather(first, second, return_exceptions=True), DEADLINE_S
        )
        seen["a after the step"] = any(
            t.request.request_id == "a" for t in (*engine.waiting, *engine.running)
        )
        await core.stop()
        return results, seen

    results, seen = asyncio.run(scenario())
    assert isinstance(results[0], RequestAbortedError)
    assert results[1].output_token_ids and results[1].finish_reason == "length"  # type: ignore[union-attr]
    assert seen == {
        "load": seen["load"],
        "slept": True,
        "b admitted during the step": False,
        "abort a": True,
        "a still in the engine": True,
        "reset refused": True,
        "a after the step": False,
    }
    assert {name.split("_")[0] for name in gated.threads} == {"engine-step"}
