"""Sampling per request: seeded tokens independent of batching, stop tokens, limits."""

from __future__ import annotations

import torch

from kvroute.replicas.model.sampling import Sampler, _top_k_top_p
from kvroute.replicas.request import SamplingParams
from tests.replicas.model.helpers import engine, run, settings, tokens

SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234)


def _sample_alone(chunk: int = 256) -> list[int]:
    e = engine(settings(hybrid=True, chunk=chunk))
    e.add_request("x", tokens(7, 21), SEEDED)
    return run(e)["x"].output_token_ids


def test_same_seed_gives_the_same_tokens_however_the_request_is_batched() -> None:
    alone = _sample_alone()
    assert len(alone) == 10
    assert _sample_alone(chunk=5) == alone  # chunked prefill
    e = engine(settings(hybrid=True, chunk=16))
    for i, n in enumerate((30, 3, 12)):
        e.add_request(f"other{i}", tokens(50 + i, n), SamplingParams(max_tokens=4 + 3 * i))
    e.add_request("x", tokens(7, 21), SEEDED)
    assert run(e)["x"].output_token_ids == alone


def test_a_preempted_request_keeps_its_sampled_tokens() -> None:
    """Preemption recomputes the KV of tokens already sampled; it draws nothing again."""
    alone = _sample_alone()
    e = engine(settings(hybrid=True, num_blocks=28, chunk=16))
    for i in range(3):
        e.add_request(f"other{i}", tokens(60 + i, 10), SamplingParams(max_tokens=14))
    e.add_request("x", tokens(7, 21), SEEDED)  # the newest: preempted first
    x = run(e)["x"]
    assert x.num_preemptions == 1
    assert x.output_token_ids == alone


def test_a_different_seed_gives_different_tokens() -> None:
    e = engine(settings(hybrid=True))
    e.add_request("x", tokens(7, 21), SEEDED)
    other = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=99)
    e.add_request("y", tokens(7, 21), other)
    outputs = run(e)
    assert outputs["x"].output_token_ids != outputs["y"].output_token_ids


def test_stop_token_ids_end_the_request() -> None:
    e = engine(settings(hybrid=False))
    prompt = tokens(8, 9)
    e.add_request("free", prompt, SamplingParams(max_tokens=8, temperature=0.0))
    free = run(e)["free"]
    assert free.finish_reason == "length" and len(free.output_token_ids) == 8
    stop = free.output_token_ids[3]
    e.add_request(
        "stopped", prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop])
    )
    stopped = run(e)["stopped"]
    first = free.output_token_ids.index(stop)
    assert stopped.finish_reason == "stop"
    assert stopped.output_token_ids == free.output_token_ids[: first + 1]


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -5.0])
    sampler = Sampler()
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=3)
    assert {sampler.sample(f"r{i}", top1, logits) for i in range(20)} == {1}
    kept = _top_k_top_p(logits, top_k=0, top_p=0.5)
    assert torch.isfinite(kept).tolist() == [False, True, False, True, False]
    kept = _top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, False, True, False]
    # top-p applies to what top-k left: renormalised, token 1 alone has 0.52 >= 0.5
    # (over the whole vocabulary it had 0.46 and token 3 stayed, as above).
    kept = _top_k_top_p(logits, top_k=2, top_p=0.5)
    assert torch.isfinite(kept).tolist() == [False, True, False, False, False]


def test_a_tiny_temperature_samples_as_the_minimum_one_instead_of_overflowing() -> None:
    """Logits over 1e-300 overflow to inf and softmax to NaN; like vLLM, the sampler
    raises such a temperature to 0.01."""
    logits = torch.linspace(-3.0, 3.0, 50)
    tiny = SamplingParams(temperature=1e-300, seed=5)
    floor = SamplingParams(temperature=0.01, seed=5)
    drawn = [Sampler().sample(f"r{i}", tiny, logits) for i in range(5)]
    assert drawn == [Sampler().sample(f"r{i}", floor, logits) for i in range(5)]
    assert drawn == [49] * 5  # at 0.01 the top logit takes almost all the mass


def test_a_batch_of_rows_samples_as_each_row_alone() -> None:
    """Greedy rows share one argmax; seeded rows still draw from their own generator."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    greedy = SamplingParams(temperature=0.0)
    requests = [("g0", greedy), ("s1", SEEDED), ("g2", greedy), ("s3", SEEDED), ("g4", greedy)]
    batched, failed = Sampler(seed=7).sample_rows(requests, logits)
    alone = Sampler(seed=7)
    assert failed == {}
    assert batched == {
        r: alone.sample(r, p, row) for (r, p), row in zip(requests, logits, strict=True)
    }
    assert [batched[r] for r in ("g0", "g2", "g4")] == logits[0::2].argmax(-1).tolist()
