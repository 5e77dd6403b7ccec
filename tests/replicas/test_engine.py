"""The continuous-batching engine: scheduling, timing, preemption, validation."""

from __future__ import annotations

import pytest

from kvroute.events.hashing import sha256
from kvroute.events.kv_events import BlockStored
from kvroute.replicas.clock import VirtualClock
from kvroute.replicas.engine import Engine, EngineConfig, InvalidRequestError
from kvroute.replicas.executor import CostModel, SimulatedExecutor, StepShape
from kvroute.replicas.kv_cache.manager import KVCacheManager
from kvroute.replicas.kv_cache.specs import KVCacheSpec
from kvroute.replicas.kv_cache.utils import RequestBlockHasher
from kvroute.replicas.request import LoRARequest, SamplingParams
from tests.replicas.conftest import config, full, swa

COST = CostModel(
    prefill_tokens_per_s=1000.0, step_base_s=0.01, decode_s_per_seq=0.001, kv_read_s_per_block=0.0
)


def _engine(
    num_blocks: int = 64,
    specs: tuple[KVCacheSpec, ...] = (full(4),),
    *,
    clock: VirtualClock | None = None,
    cost: CostModel = COST,
    **engine_kwargs: object,
) -> Engine:
    engine_config = EngineConfig(**{"max_model_len": 256, "vocab_size": 100, **engine_kwargs})  # type: ignore[arg-type]
    manager = KVCacheManager(
        config(num_blocks, *specs),
        max_model_len=engine_config.max_model_len,
        hash_block_size=min(s.block_size for s in specs),
        enable_kv_cache_events=True,
        max_num_batched_tokens=engine_config.max_num_batched_tokens,
    )
    return Engine(
        manager,
        engine_config,
        SimulatedExecutor(cost, vocab_size=engine_config.vocab_size, seed=7),
        clock or VirtualClock(),
        RequestBlockHasher(min(s.block_size for s in specs), sha256, b"root"),  # type: ignore[arg-type]
    )


def _run(engine: Engine, clock: VirtualClock, max_steps: int = 1000) -> dict[str, object]:
    """Step until idle, advancing virtual time by each step's duration."""
    finished = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return finished
        result = engine.step()
        clock.advance_to(result.start_time + result.duration)
        for out in result.outputs:
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("engine did not go idle")


def test_cost_model_prices_prefill_decode_and_kv_reads() -> None:
    cost = CostModel(
        prefill_tokens_per_s=1000,
        step_base_s=0.01,
        decode_s_per_seq=0.001,
        kv_read_s_per_block=0.0001,
    )
    assert cost.step_time(StepShape(0, 0, 0)) == 0.0
    assert cost.step_time(StepShape(500, 3, 10)) == pytest.approx(0.01 + 0.5 + 0.003 + 0.001)
    with pytest.raises(ValueError, match="prefill_tokens_per_s must be positive"):
        CostModel(prefill_tokens_per_s=0)


def test_one_request_prefills_then_decodes_to_max_tokens() -> None:
    clock = VirtualClock()
    engine = _engine(clock=clock)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=3))
    first = engine.step()
    # Prefill of 40 tokens: 0.01 + 40 / 1000.
    assert first.duration == pytest.approx(0.05)
    assert first.num_scheduled_tokens == 40
    assert [o.new_token_ids for o in first.outputs] == [[first.outputs[0].new_token_ids[0]]]
    clock.advance_to(first.duration)
    done = _run(engine, clock)
    out = done["a"]
    assert out.finish_reason == "length" and len(out.output_token_ids) == 3
    assert out.metrics.first_token_time == pytest.approx(0.05)
    # Two decode steps of one sequence each: 0.011 s.
    assert out.metrics.finish_time == pytest.approx(0.05 + 2 * 0.011)
    assert engine.kv_cache.usage == 0.0


def test_output_tokens_depend_only_on_seed_and_request_id() -> None:
    solo, batched = _engine(), _engine()
    solo.add_request("x", [1, 2, 3], SamplingParams(max_tokens=5))
    batched.add_request("y", [9] * 30, SamplingParams(max_tokens=5))
    batched.add_request("x", [1, 2, 3], SamplingParams(max_tokens=5))
    a = _run(solo, solo.clock)["x"]  # type: ignore[arg-type]
    b = _run(batched, batched.clock)["x"]  # type: ignore[arg-type]
    assert a.output_token_ids == b.output_token_ids
    assert all(0 <= t < 100 for t in a.output_token_ids)


def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    clock = VirtualClock()
    engine = _engine(clock=clock, max_num_batched_tokens=32)
    engine.add_request("long", list(range(100)), SamplingParams(max_tokens=1))
    scheduled = []
    while engine.has_work:
        result = engine.step()
        clock.advance_to(result.start_time + result.duration)
        scheduled.append(result.num_scheduled_tokens)
    assert scheduled == [32, 32, 32, 4]


def test_second_request_reuses_the_shared_prefix() -> None:
    clock = VirtualClock()
    engine = _engine(clock=clock)
    engine.add_request("a", list(range(40)), SamplingParams(max_tokens=1))
    _run(engine, clock)
    engine.add_request("b", [*range(32), 77, 78, 79], SamplingParams(max_tokens=1))
    result = engine.step()
    assert result.outputs[0].num_cached_tokens == 32
    assert result.num_scheduled_tokens == 3


def test_running_requests_are_preempted_by_recompute_and_still_finish() -> None:
    clock = VirtualClock()
    # 12 usable 4-token blocks: two 20-token prompts fit (5 blocks each), but
    # not both decoding to 40 tokens.
    engine = _engine(13, clock=clock)
    engine.add_request("old", list(range(20)), SamplingParams(max_tokens=20))
    engine.add_request("new", list(range(50, 70)), SamplingParams(max_tokens=20))
    done = _run(engine, clock)
    assert set(done) == {"old", "new"}
    assert all(len(o.output_token_ids) == 20 for o in done.values())
    assert engine.num_preemptions >= 1
    assert done["new"].num_preemptions >= 1 and done["old"].num_preemptions == 0


def test_max_num_seqs_caps_the_running_batch() -> None:
    engine = _engine(max_num_seqs=2)
    for i in range(3):
        engine.add_request(str(i), [i] * 8, SamplingParams(max_tokens=4))
    engine.step()
    assert (len(engine.running), len(engine.waiting)) == (2, 1)
    load = engine.load()
    assert (load.running_seqs, load.waiting_seqs, load.queued_prefill_tokens) == (2, 1, 8)


def test_each_step_publishes_its_cache_events_in_one_batch() -> None:
    engine = _engine(specs=(full(4), swa(4, 8)))
    engine.add_request("a", list(range(13)), SamplingParams(max_tokens=1))
    batch = engine.step().events
    assert batch is not None and batch.ts == 0.0
    assert [
        (e.group_idx, len(e.block_hashes)) for e in batch.events if isinstance(e, BlockStored)
    ] == [
        (0, 3),
        (1, 3),
    ]
    snapshot = engine.snapshot()
    assert {g: len(h) for g, h in snapshot.items()} == {0: 3, 1: 3}


@pytest.mark.parametrize(
    ("tokens", "params", "lora", "message"),
    [
        ([], SamplingParams(max_tokens=1), None, "prompt is empty"),
        (list(range(256)), SamplingParams(max_tokens=1), None, "max_model_len is 256"),
        (
            [1, 100],
            SamplingParams(max_tokens=1),
            None,
            r"token id 100 is outside the vocabulary \[0, 100\)",
        ),
        ([1], SamplingParams(max_tokens=1), LoRARequest("nope", 1), "unknown LoRA adapter 'nope'"),
        ([1], SamplingParams(max_tokens=None), None, "max_tokens must be at least 1"),
    ],
)
def test_invalid_requests_are_refused_with_the_reason(tokens, params, lora, message: str) -> None:
    engine = _engine()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("r", tokens, params, lora_request=lora)
    assert not engine.has_work


def test_known_lora_is_accepted_and_duplicate_ids_are_refused() -> None:
    engine = _engine(lora_names=("adapter",))
    engine.add_request(
        "r", [1, 2], SamplingParams(max_tokens=1), lora_request=LoRARequest("adapter", 1)
    )
    with pytest.raises(InvalidRequestError, match="already in flight"):
        engine.add_request("r", [1, 2], SamplingParams(max_tokens=1))


def test_abort_frees_the_request() -> None:
    engine = _engine()
    engine.add_request("r", list(range(30)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.kv_cache.usage > 0
    assert engine.abort_request("r")
    assert not engine.abort_request("r")
    assert engine.kv_cache.usage == 0.0 and not engine.has_work


def test_fused_decode_steps_match_single_steps() -> None:
    def run(max_decode_steps: int) -> tuple[dict[str, object], int]:
        clock = VirtualClock()
        # A KV-read cost makes each step's time depend on the context lengths.
        engine = _engine(clock=clock, cost=CostModel(1000.0, 0.01, 0.001, 0.0001))
        for i, length in enumerate((20, 33, 41)):
            engine.add_request(str(i), [i + 1] * length, SamplingParams(max_tokens=12 + 5 * i))
        finished = {}
        calls = 0
        while engine.has_work:
            result = engine.step(max_decode_steps=max_decode_steps)
            calls += 1
            clock.advance_to(result.start_time + result.duration)
            finished.update({o.request_id: o for o in result.outputs if o.finished})
        return finished, calls

    single, single_calls = run(1)
    fused, fused_calls = run(64)
    assert fused_calls < single_calls // 3
    for request_id, out in single.items():
        other = fused[request_id]
        assert other.output_token_ids == out.output_token_ids
        assert other.metrics.first_token_time == pytest.approx(out.metrics.first_token_time)
        assert other.metrics.finish_time == pytest.approx(out.metrics.finish_time)


def test_fused_decode_stops_at_the_deadline() -> None:
    clock = VirtualClock()
    engine = _engine(clock=clock)
    engine.add_request("a", [1] * 8, SamplingParams(max_tokens=100))
    clock.advance_to(engine.step().duration)  # prefill
    # One decode step costs 0.011 s: a 0.05 s deadline allows 4 of them.
    result = engine.step(max_decode_steps=64, deadline=clock.now() + 0.05)
    assert result.num_scheduled_tokens == 4
    assert result.duration == pytest.approx(4 * 0.011)


def test_fused_decode_waits_for_a_prefill_with_one_token_left() -> None:
    clock = VirtualClock()
    engine = _engine(clock=clock, max_num_batched_tokens=32)
    # 33 tokens in 32-token chunks: the second step has one prompt token left.
    engine.add_request("a", list(range(33)), SamplingParams(max_tokens=10))
    clock.advance_to(engine.step().duration)
    result = engine.step(max_decode_steps=64)
    assert result.num_scheduled_tokens == 1
    (out,) = result.outputs
    assert out.metrics.first_token_time == pytest.approx(clock.now() + result.duration)
