"""ReplicaCore, the serving loop every replica runs: one bad request fails alone,
and a loop that dies says so (not ready, its callers told, `on_death` run once)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from kvroute.events.publisher import PublisherConfig, ZmqEventPublisher
from kvroute.replicas.api import (
    EngineDeadError,
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    RequestFailedError,
    SamplingOptions,
)
from kvroute.replicas.clock import RealClock
from kvroute.replicas.factory import build_engine
from kvroute.replicas.serving import ReplicaCore
from kvroute.router.config import load_config
from tests.replicas.faults import MARK, PoisonedExecutor
from tests.replicas.serve_helpers import tiny_config

DEADLINE_S = 30.0
VOCAB = 256  # the tiny config's


def _core(tmp_path: Path, events: bool = False) -> ReplicaCore:
    settings = load_config(tiny_config(tmp_path)).replica_settings()
    engine = build_engine(settings, RealClock(), events=events)
    engine.executor = PoisonedExecutor(engine.executor)
    return ReplicaCore("replica-0", engine)


def _request(request_id: str, prompt: list[int], **sampling: object) -> GenerateRequest:
    return GenerateRequest(
        request_id,
        prompt,
        max_tokens=4,
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
    )


def _ordinary(i: int) -> GenerateRequest:
    return _request(f"ok-{i}", [1 + i % 50, 2, 3, 4, 5, 6])


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_request_the_engine_fails_ends_alone_and_the_loop_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core = _core(tmp_path)

    async def scenario() -> tuple[list[GenerateResult | BaseException], list[GenerateResult]]:
        core.start(None)
        batch = [_ordinary(i) for i in range(4)]
        batch.insert(2, _request("poisoned", [*MARK, 9, 9]))
        first = await asyncio.wait_for(
            asyncio.gather(*(core.generate(r) for r in batch), return_exceptions=True),
            DEADLINE_S,
        )
        after = await asyncio.wait_for(
            asyncio.gather(*(core.generate(_ordinary(100 + i)) for i in range(100))), DEADLINE_S
        )
        await core.stop()
        return first, after

    with caplog.at_level(logging.ERROR):
        first, after = asyncio.run(scenario())

    failure = first.pop(2)
    assert isinstance(failure, RequestFailedError)
    assert str(failure) == "request poisoned failed in the engine"
    assert [r.finish_reason for r in first] == ["length"] * 4  # type: ignore[union-attr]
    assert [r.finish_reason for r in after] == ["length"] * 100
    assert _errors(caplog) == [
        "request poisoned failed in the engine of replica replica-0; it was dropped"
    ]
    assert core.death is None
    assert core.engine.kv_cache.usage == 0.0


def test_a_ray_caller_that_bypasses_the_door_gets_the_field_named(tmp_path: Path) -> None:
    core = _core(tmp_path)
    bad = {
        "seed": {"seed": 2**64},
        "temperature": {"temperature": float("nan")},
        "top_p": {"top_p": 0.0},
        "top_k": {"top_k": -1},
        "stop_token_ids": {"stop_token_ids": (VOCAB,)},
    }

    async def scenario() -> dict[str, str | None]:
        core.start(None)
        params: dict[str, str | None] = {}
        for field, sampling in bad.items():
            with pytest.raises(InvalidRequestError) as refused:
                await core.generate(_request(field, [1, 2, 3], **sampling))
            params[field] = refused.value.param
        result = await asyncio.wait_for(core.generate(_ordinary(0)), DEADLINE_S)
        assert result.finish_reason == "length"
        await core.stop()
        return params

    assert asyncio.run(scenario()) == {field: field for field in bad}


def test_a_dead_loop_reports_not_ready_tells_its_callers_and_runs_on_death_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing a step's events to a closed publisher kills the loop itself: a
    fault of no request."""
    core = _core(tmp_path, events=True)
    deaths: list[str] = []
    core.on_death = lambda: deaths.append(core.replica_id)
    publisher = ZmqEventPublisher(
        PublisherConfig(endpoint=f"ipc://{tmp_path}/pub", replay_endpoint=None)
    )

    async def scenario() -> BaseException | None:
        core.start(publisher)
        publisher.close()
        try:
            await asyncio.wait_for(core.generate(_ordinary(0)), DEADLINE_S)
        except EngineDeadError as exc:
            return exc
        return None

    with caplog.at_level(logging.ERROR):
        error = asyncio.run(scenario())

    assert str(error) == "the engine of replica replica-0 has stopped"
    assert not core.serving
    assert deaths == ["replica-0"]
    assert _errors(caplog) == [
        "the engine loop of replica replica-0 died in step 1; requests in flight: ok-0"
    ]
    with pytest.raises(EngineDeadError):
        core.load()
    with pytest.raises(EngineDeadError):
        asyncio.run(core.generate(_ordinary(1)))
