"""How an engine turns the blocks it holds into a prompt's computed tokens.

The index runs the engine's own `PrefixHitFinder` over its view of the engine's cache;
a `HitRule` adds what differs between engine kinds around that search. vLLM (and
kvroute's replicas, which follow it) never reports the whole prompt as computed: the
last prompt token is always run again to produce the first output's logits, so the hit
is searched within `num_tokens - 1`. An engine that keeps the last position's logits
cached could serve a whole prompt from its cache, and declares so here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HitRule:
    """`name` identifies the rule (replicas with the same layout and rule are predicted
    together); `recomputes_last_token` caps a hit one token short of the prompt."""

    name: str
    recomputes_last_token: bool = True

    def max_hit_tokens(self, num_tokens: int) -> int:
        """The longest hit this engine can report for a prompt of `num_tokens`."""
        return num_tokens - 1 if self.recomputes_last_token else num_tokens


VLLM_HIT_RULE = HitRule("vllm")
