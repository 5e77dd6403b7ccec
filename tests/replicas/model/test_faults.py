"""One bad request fails alone in a torch engine: the others' tokens are exactly
those of a run without it, and its blocks are freed and never hit."""

from __future__ import annotations

from kvroute.replicas.engine import Engine
from kvroute.replicas.request import SamplingParams
from tests.replicas.faults import MARK, PoisonedExecutor
from tests.replicas.model.helpers import engine, run, settings, tokens


def _sampled(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=seed)


def _poisoned_engine() -> Engine:
    e = engine(settings(hybrid=True))
    e.executor = PoisonedExecutor(e.executor)
    return e


def _run_failing(e: Engine) -> tuple[dict[str, list[int]], dict[str, Exception], dict[str, int]]:
    """Step until idle: finished tokens, failures and preemptions by request id."""
    finished: dict[str, list[int]] = {}
    failed: dict[str, Exception] = {}
    preemptions: dict[str, int] = {}
    while e.has_work:
        result = e.step()
        failed.update(result.failed)
        for out in result.outputs:
            if out.finished:
                finished[out.request_id] = out.output_token_ids
                preemptions[out.request_id] = out.num_preemptions
    return finished, failed, preemptions


def _clean_tokens(prompts: dict[str, list[int]], seeds: dict[str, int]) -> dict[str, list[int]]:
    e = engine(settings(hybrid=True))
    for rid, prompt in prompts.items():
        e.add_request(rid, prompt, _sampled(seeds[rid]))
    return {rid: out.output_token_ids for rid, out in run(e).items()}


def test_a_step_that_fails_is_rerun_alone_and_only_the_culprit_fails() -> None:
    clean = {"a": tokens(1, 13), "b": tokens(2, 9)}
    seeds = {"a": 11, "b": 12, "p": 13}
    e = _poisoned_engine()
    e.add_request("a", clean["a"], _sampled(11))
    e.add_request("p", MARK + tokens(3, 10), _sampled(13))
    e.add_request("b", clean["b"], _sampled(12))

    finished, failed, _ = _run_failing(e)

    assert list(failed) == ["p"]
    assert str(failed["p"]) == "injected executor fault"
    assert finished == _clean_tokens(clean, seeds)
    assert e.kv_cache.usage == 0.0  # every block freed, the culprit's included
    reference = engine(settings(hybrid=True))
    for rid, prompt in clean.items():
        reference.add_request(rid, prompt, _sampled(seeds[rid]))
    run(reference)
    # The culprit's blocks were cached when allocated, never written: none stays.
    assert len(e.kv_cache.block_pool.cached_block_hash_to_block) == len(
        reference.kv_cache.block_pool.cached_block_hash_to_block
    )


def test_a_request_that_hit_the_culprits_unwritten_blocks_recomputes_them() -> None:
    """Choices of one prompt are admitted in one step; the second hits the blocks
    the first (the culprit) was given. It is preempted and recomputes them."""
    prompt = MARK + tokens(4, 10)
    e = _poisoned_engine()
    e.executor.is_marked = lambda request: request.request_id == "p"  # type: ignore[attr-defined]
    e.add_request("p", prompt, _sampled(21))
    e.add_request("q", prompt, _sampled(22))

    finished, failed, preemptions = _run_failing(e)

    assert list(failed) == ["p"]
    assert preemptions == {"q": 1}
    assert finished == _clean_tokens({"q": prompt}, {"q": 22})
    assert e.kv_cache.usage == 0.0


def test_a_request_whose_sampling_fails_fails_alone_within_its_step() -> None:
    """A seed torch refuses (set after validation, as a bug would) fails its own
    request at sampling; the step's other tokens stand, with no rerun."""
    clean = {"a": tokens(5, 12), "b": tokens(6, 7)}
    seeds = {"a": 31, "b": 32}
    e = engine(settings(hybrid=True))
    e.add_request("a", clean["a"], _sampled(31))
    bad = _sampled(33)
    e.add_request("p", tokens(7, 11), bad)
    bad.seed = 2**64
    e.add_request("b", clean["b"], _sampled(32))

    finished, failed, preemptions = _run_failing(e)

    assert list(failed) == ["p"]
    assert isinstance(failed["p"], ValueError)
    assert finished == _clean_tokens(clean, seeds)
    assert preemptions == {"a": 0, "b": 0}
    assert e.kv_cache.usage == 0.0
