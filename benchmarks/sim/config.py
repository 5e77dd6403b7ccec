"""The benchmark parameter file (configs/bench.yaml): replica, router and
simulation settings, typed like the cluster config (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from kvroute.benchmarks.sim.simulator import SimConfig
from kvroute.replicas.config import (
    Struct,
)
from kvroute.router.config import DeploymentSections, load_config


class SimulationSection(Struct):
    event_delay_s: float = 0.005
    event_drop_rate: float = 0.0
    replay_delay_s: float = 0.01
    max_decode_steps: int = 64
    seed: int = 0


class BenchConfig(DeploymentSections):
    simulation: SimulationSection = SimulationSection()

    def sim_config(self, policy: str, replicas: int | None = None, **options: Any) -> SimConfig:
        settings = self.replica_settings()
        sim = self.simulation
        return SimConfig(
            settings=settings,
            replicas=replicas or self.replicas.count,
            policy=policy,
            policy_options=options
            or (self.router.policy_options if policy == self.router.policy else {}),
            prediction_ttl_s=self.router.prediction_ttl_s,
            reuse_memory=self.router.reuse_memory,
            event_delay_s=sim.event_delay_s,
            event_drop_rate=sim.event_drop_rate,
            replay_delay_s=sim.replay_delay_s,
            max_decode_steps=sim.max_decode_steps,
            seed=sim.seed,
        )

    def with_replicas(self, count: int) -> BenchConfig:
        """The same parameters for `count` replicas, so every report states the count run."""
        if count < 1:
            raise ValueError(f"replicas must be >= 1, got {count}")
        return msgspec.structs.replace(
            self, replicas=msgspec.structs.replace(self.replicas, count=count)
        )

    def describe(self) -> str:
        m, r, c = self.model, self.replicas, self.replicas.cost
        return (
            f"{r.count} replicas x {m.num_blocks} blocks of {m.block_size} tokens "
            f"({m.num_blocks * m.block_size:,} tokens of KV cache each, "
            f"{'+'.join(g.kind for g in m.groups)}); prefill {c.prefill_tokens_per_s:,.0f} tok/s, "
            f"step {c.step_base_s * 1e3:.1f} ms + {c.decode_s_per_seq * 1e3:.2f} ms/seq; "
            f"max_num_seqs {r.max_num_seqs}, batch {r.max_num_batched_tokens} tokens; "
            f"events delayed {self.simulation.event_delay_s * 1e3:.0f} ms, "
            f"drop rate {self.simulation.event_drop_rate:.1%}; hash {self.hashing.algo}; "
            f"eviction {self._eviction()}"
        )

    def _eviction(self) -> str:
        fraction = self.replicas.probation_fraction
        if fraction is None:
            return "LRU"
        hints = (
            f"router reuse hints over {self.router.reuse_memory:g}x the cluster cache"
            if self.router.reuse_memory
            else "no router hints"
        )
        return f"segmented LRU (probation {fraction:.0%}, {hints})"


def load_bench_config(path: str | Path) -> BenchConfig:
    return load_config(path, BenchConfig)
