"""Build an engine exactly as a replica config describes it (no Ray needed).

The Ray actor and the simulator both call `build_engine`, so a simulated
replica is the same engine, cache manager and executor as a live one.
"""

from __future__ import annotations

from events.hashing import get_hash_fn_by_name
from replicas.clock import Clock
from replicas.config import ReplicaSettings
from replicas.engine import Engine, EngineConfig
from replicas.executor import CostModel, SimulatedExecutor
from replicas.kv_cache.manager import KVCacheManager
from replicas.kv_cache.utils import BlockHash, RequestBlockHasher


def build_engine(
    config: ReplicaSettings, clock: Clock, seed_offset: int = 0, events: bool = True
) -> Engine:
    """An engine (with its cache manager) exactly as the config describes it."""
    model, replicas = config.model, config.replicas
    kv_cache_config = model.kv_cache_config()
    hash_fn = get_hash_fn_by_name(config.hashing.algo)
    manager = KVCacheManager(
        kv_cache_config,
        max_model_len=model.max_model_len,
        hash_block_size=model.hash_block_size,
        use_eagle=model.use_eagle,
        enable_kv_cache_events=events,
        max_num_batched_tokens=replicas.max_num_batched_tokens,
        prefix_cache_retention_interval=replicas.retention_interval,
        probation_fraction=replicas.probation_fraction,
    )
    cost = replicas.cost
    executor = SimulatedExecutor(
        CostModel(
            prefill_tokens_per_s=cost.prefill_tokens_per_s,
            step_base_s=cost.step_base_s,
            decode_s_per_seq=cost.decode_s_per_seq,
            kv_read_s_per_block=cost.kv_read_s_per_block,
        ),
        vocab_size=model.vocab_size,
        seed=replicas.seed + seed_offset,
    )
    engine_config = EngineConfig(
        max_num_seqs=replicas.max_num_seqs,
        max_num_batched_tokens=replicas.max_num_batched_tokens,
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
        lora_names=tuple(model.lora_names),
    )
    hasher = RequestBlockHasher(
        model.hash_block_size, hash_fn, BlockHash(hash_fn(config.hashing.seed))
    )
    return Engine(manager, engine_config, executor, clock, hasher)
