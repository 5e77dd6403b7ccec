"""Caching changes nothing: the real engine with the torch executor produces the
same greedy tokens with prefix caching on and off, and with freed blocks
poisoned, over a workload that evicts cached blocks and preempts requests."""

from __future__ import annotations

import pytest
import torch

from kvroute.events.kv_events import BlockRemoved
from kvroute.replicas.clock import VirtualClock
from kvroute.replicas.factory import build_engine
from kvroute.replicas.request import SamplingParams
from tests.replicas.model.helpers import Recorder, settings, tokens

# Pools small enough that decoding requests preempt each other and finished
# prefixes get evicted; the hybrid model's window group needs more blocks.
NUM_BLOCKS = {False: 40, True: 56}


def _workload() -> dict[str, list[int]]:
    """16 requests over three shared 16-token prefixes, suffixes of 4-20 tokens."""
    prefixes = [tokens(100 + i, 16) for i in range(3)]
    return {f"q{i}": prefixes[i % 3] + tokens(i, 4 + (i * 5) % 17) for i in range(16)}


def _serve(hybrid: bool, *, caching: bool = True, poison: bool = False) -> dict[str, object]:
    config = settings(
        hybrid=hybrid,
        num_blocks=NUM_BLOCKS[hybrid],
        chunk=32,
        max_num_seqs=6,
        caching=caching,
        poison=poison,
    )
    e = build_engine(config, VirtualClock(), events=True)
    rec = Recorder()
    rec.attach(e)
    for request_id, prompt in _workload().items():
        e.add_request(request_id, prompt, SamplingParams(max_tokens=12, temperature=0.0))
    outputs: dict[str, list[int]] = {}
    cached = removed = 0
    while e.has_work:
        result = e.step()
        if result.events is not None:
            removed += sum(isinstance(ev, BlockRemoved) for ev in result.events.events)
        for out in result.outputs:
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
                cached += out.num_cached_tokens
    return {
        "outputs": outputs,
        "cached": cached,
        "evicted": removed,
        "preemptions": e.num_preemptions,
        "finite": all(bool(torch.isfinite(row).all()) for _, _, row in rec.rows),
    }


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "hybrid"])
def test_prefix_caching_changes_no_greedy_token(hybrid: bool) -> None:
    on = _serve(hybrid, caching=True)
    off = _serve(hybrid, caching=False)
    assert on["cached"] and on["evicted"] and on["preemptions"]
    assert off["cached"] == 0 and off["preemptions"]
    assert on["outputs"] == off["outputs"]


@pytest.mark.parametrize("hybrid", [False, True], ids=["full", "hybrid"])
def test_poisoned_free_blocks_change_nothing(hybrid: bool) -> None:
    """Free, uncached blocks (and the null block) are NaN at every step: a read of
    stale memory would turn logits into NaN or change a token."""
    clean = _serve(hybrid)
    poisoned = _serve(hybrid, poison=True)
    assert poisoned["finite"]
    assert poisoned["outputs"] == clean["outputs"]
    assert poisoned["cached"] == clean["cached"] and poisoned["preemptions"]
