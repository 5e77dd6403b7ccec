"""Discrete-event simulation workloads: requests, Mooncake traces, generators, bounds."""

from kvroute.benchmarks.sim.bounds import (
    HitRateBound,
    belady_hit_rate,
    infinite_cache_hit_rate,
    pooled_lru_hit_rate,
)
from kvroute.benchmarks.sim.generators import (
    agentic_tool_loops,
    generated_shared_prefix,
    multi_tenant,
    multi_turn_chat,
)
from kvroute.benchmarks.sim.traces import TRACE_DIR, TRACE_FILES, load_mooncake, trace_path
from kvroute.benchmarks.sim.workload import (
    DEFAULT_VOCAB_SIZE,
    BlockId,
    BlockRun,
    ContentBlock,
    LiteralTokens,
    PromptSpec,
    Segment,
    SimRequest,
    Workload,
    block_keys,
    block_runs,
    content_tokens,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "TRACE_DIR",
    "TRACE_FILES",
    "BlockId",
    "BlockRun",
    "ContentBlock",
    "HitRateBound",
    "LiteralTokens",
    "PromptSpec",
    "Segment",
    "SimRequest",
    "Workload",
    "agentic_tool_loops",
    "belady_hit_rate",
    "block_keys",
    "block_runs",
    "content_tokens",
    "generated_shared_prefix",
    "infinite_cache_hit_rate",
    "load_mooncake",
    "multi_tenant",
    "multi_turn_chat",
    "pooled_lru_hit_rate",
    "trace_path",
]
