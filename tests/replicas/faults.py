"""Fault injection for engine tests: a real executor that fails marked requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvroute.replicas.executor import Executor, ScheduledRequest, StepOutput, StepShape
from kvroute.replicas.executor_torch import TorchExecutor
from kvroute.replicas.request import Request

MARK = [7, 7, 7, 7]  # a prompt starting with these tokens is poisoned


def marked(request: Request) -> bool:
    return list(request.prompt_token_ids[: len(MARK)]) == MARK


class PoisonedExecutor:
    """Wraps a real executor; any step holding a marked request raises, as a bug in
    a model or kernel would, naming no request. A torch executor runs the step's
    forward pass first, so the fault strikes after the step's KV was written (a
    rerun must rewrite it). Raises before any token is drawn (the executor contract)."""

    def __init__(self, inner: Executor, is_marked: Callable[[Request], bool] = marked) -> None:
        self.inner = inner
        self.measures_time = inner.measures_time
        self.is_marked = is_marked
        self.faults = 0

    def execute(self, batch: Sequence[ScheduledRequest], shape: StepShape) -> StepOutput:
        if any(self.is_marked(s.request) for s in batch):
            self.faults += 1
            if isinstance(self.inner, TorchExecutor):
                self.inner.forward(batch)
            raise RuntimeError("injected executor fault")
        return self.inner.execute(batch, shape)

    def forget(self, request_id: str) -> None:
        self.inner.forget(request_id)
