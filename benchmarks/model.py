"""The torch executor measured: step costs, throughput, TTFT under prefix hits.

1. Step costs at 1 thread (as each replica runs): prefill steps of 128-2,048
   tokens and decode steps of 1-32 sequences, fitted by least squares to the
   simulator's `CostModel` (step = base + prefill tokens / speed + decode
   sequences x per-sequence cost), printed as a `replicas.cost` section.
2. Throughput at 1 and 2 threads: prefill tokens/s (2,048-token prompt) and
   decode tokens/s (32 sequences of ~512 tokens, one token each per step).
3. TTFT of a 4,096-token prompt at 0%, 50% and 90% prefix hit, through the
   real engine (one prefill step), and the paged prefill against the dense
   reference (the same weights, plain attention, no cache) on the same prompt.
4. Against Hugging Face transformers (SDPA attention) on the same weights (the
   model saved with `save_checkpoint`, loaded by transformers) at 1 thread:
   prefill tokens/s of a 2,048-token prompt (transformers keeping only the last
   token's logits, as generate does) and decode tokens/s at batch 8 (~512-token
   contexts). CPU time of this process, in paired rounds that alternate the two
   (a prefill each; 4 decode steps each), so load from other processes hits
   both alike; ratios are kvroute / HF speed.

The model is the one in the config (default: configs/default.yaml, a 4-layer
hybrid), with enough KV memory for the 4,096-token prompts. Times are medians,
in CPU time of this process at 1 thread (steady on a shared machine) and in
wall time for the 1- vs 2-thread throughput.

Run: python -m benchmarks.model [--config PATH] [--repeats N] [--rounds N] [--hf-only]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import torch
from tqdm import tqdm

from kvroute.replicas.clock import RealClock
from kvroute.replicas.config import ReplicaSettings
from kvroute.replicas.engine import Engine
from kvroute.replicas.executor_torch import TorchExecutor
from kvroute.replicas.factory import build_engine
from kvroute.replicas.model.attention import DenseAttention
from kvroute.replicas.model.weights import save_checkpoint
from kvroute.replicas.request import SamplingParams
from kvroute.router.config import load_config

PROMPT = 4096
PREFILL_TOKENS = (128, 512, 1024, 2048)
DECODE_SEQS = (1, 4, 8, 16, 32)
GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0)
# Decode steps per side in each paired round: back to back, as a server runs
# them, so each side is timed with its own weights in the CPU caches.
DECODE_RUN = 4


def settings(path: str) -> ReplicaSettings:
    config = load_config(path).replica_settings()
    return msgspec.structs.replace(
        config,
        model=msgspec.structs.replace(config.model, max_model_len=max(8192, PROMPT * 2)),
        replicas=msgspec.structs.replace(
            config.replicas,
            executor="torch",
            kv_cache_memory="128MiB",
            max_num_batched_tokens=PROMPT,
            max_num_seqs=64,
            poison_free_blocks=False,
        ),
    )


class Bench:
    def __init__(self, config: ReplicaSettings, repeats: int) -> None:
        self.engine: Engine = build_engine(config, RealClock(), events=False)
        assert isinstance(self.engine.executor, TorchExecutor)
        self.executor = self.engine.executor
        self.vocab = config.model.vocab_size
        self.repeats = repeats
        self.rng = random.Random(0)
        self.ids = 0
        # CPU seconds of this process: at 1 thread what an idle core would take,
        # whatever else runs on the machine; wall time where threads differ.
        self.clock: Callable[[], float] = time.process_time

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def add(self, prompt: list[int], max_tokens: int = 1) -> str:
        self.ids += 1
        request_id = f"b{self.ids}"
        self.engine.add_request(
            request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)
        )
        return request_id

    def drain(self) -> None:
        while self.engine.has_work:
            self.engine.step()

    def ttft(self, prompt: list[int]) -> tuple[float, int]:
        """Seconds from adding a request on an idle engine to its first token,
        and its number of cached (hit) tokens."""
        start = self.clock()
        self.add(prompt)
        while not (outputs := [o for o in self.engine.step().outputs if o.new_token_ids]):
            pass
        elapsed = self.clock() - start
        self.drain()
        return elapsed, outputs[0].num_cached_tokens

    def median(self, measure: Callable[[], float]) -> float:
        return statistics.median(measure() for _ in range(self.repeats))

    def prefill_step(self, n: int) -> float:
        """One step prefilling a fresh n-token prompt (no hit)."""
        return self.ttft(self.tokens(n))[0]

    def decode_step(self, seqs: int, context: int = 512) -> float:
        """One decode step of `seqs` sequences of ~`context` tokens."""
        waiting = {self.add(self.tokens(context), max_tokens=8) for _ in range(seqs)}
        while waiting:  # prefill (over several steps if the budget is short)
            waiting -= {o.request_id for o in self.engine.step().outputs if o.new_token_ids}
        start = self.clock()
        result = self.engine.step()  # every sequence decodes one token
        elapsed = self.clock() - start
        assert result.num_scheduled_tokens == seqs
        self.drain()
        return elapsed

    def fit(self) -> tuple[float, float, float, list[tuple[str, float]]]:
        """(prefill tokens/s, step base s, decode s per seq): base and per-sequence
        cost by least squares over decode steps, then the prefill speed over
        prefill steps with that base (attention makes long prefills superlinear,
        which a joint fit would absorb into a negative base)."""
        decode = [(s, self.median(lambda s=s: self.decode_step(s))) for s in DECODE_SEQS]
        prefill = [(n, self.median(lambda n=n: self.prefill_step(n))) for n in PREFILL_TOKENS]
        per_seq, base = np.polyfit([s for s, _ in decode], [t for _, t in decode], 1)
        base = max(float(base), 0.0)
        tokens = np.array([n for n, _ in prefill], dtype=float)
        spent = np.array([t for _, t in prefill]) - base
        speed = float(tokens @ tokens / (tokens @ spent))
        rows = [(f"prefill {n}", t) for n, t in prefill] + [(f"decode x{s}", t) for s, t in decode]
        return speed, base, float(per_seq), rows

    def hit_ttft(self, fraction: float) -> tuple[int, float]:
        """(hit tokens, TTFT) of a 4,096-token prompt whose first `fraction` is cached."""
        shared = self.tokens(PROMPT)
        self.add(shared)
        self.drain()
        keep = int(PROMPT * fraction)
        runs = [self.ttft(shared[:keep] + self.tokens(PROMPT - keep)) for _ in range(self.repeats)]
        return runs[0][1], statistics.median(t for t, _ in runs)

    def dense_prefill(self) -> float:
        prompt = torch.tensor(self.tokens(PROMPT))
        positions = torch.arange(PROMPT)
        model, arch = self.executor.model, self.executor.arch

        def run() -> float:
            start = self.clock()
            with torch.inference_mode():
                model(
                    prompt,
                    positions,
                    DenseAttention(arch, PROMPT, torch.device("cpu")),
                    torch.tensor([PROMPT - 1]),
                )
            return self.clock() - start

        return self.median(run)


def cpu_time(run: Callable[[], object]) -> float:
    """CPU seconds (all threads of this process) that `run` takes."""
    start = time.process_time()
    run()
    return time.process_time() - start


class HFComparison:
    """kvroute's engine and transformers' model on the same weights."""

    def __init__(self, bench: Bench, context: int = 512, batch: int = 8) -> None:
        import transformers  # a dev dependency: imported only for this part

        self.bench = bench
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(bench.executor.model, Path(tmp))
            self.hf = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, attn_implementation="sdpa", dtype=bench.executor.arch.dtype
            ).eval()
        self.context, self.batch = context, batch

    def prefill(self, rounds: int) -> tuple[float, float]:
        """Median CPU seconds of a 2,048-token prefill: (kvroute, HF)."""
        ours, theirs = [], []
        for _ in range(rounds):
            prompt = self.bench.tokens(2048)
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                theirs.append(cpu_time(lambda ids=ids: self.hf(ids, logits_to_keep=1)))
            ours.append(cpu_time(lambda prompt=prompt: self.bench.ttft(prompt)))
        return statistics.median(ours), statistics.median(theirs)

    def decode(self, rounds: int) -> tuple[float, float]:
        """Median CPU seconds of one decode step of `batch` sequences: (kvroute, HF)."""
        import transformers

        prompts = [self.bench.tokens(self.context) for _ in range(self.batch)]
        for prompt in prompts:
            self.bench.add(prompt, max_tokens=rounds * DECODE_RUN + 2)
        while self.bench.engine.step().num_scheduled_tokens > self.batch:
            pass  # prefill (and the first sampled token) until every step is a decode
        cache = transformers.DynamicCache(config=self.hf.config)
        with torch.inference_mode():
            logits = self.hf(torch.tensor(prompts), cache=cache, logits_to_keep=1).logits
            step = logits[:, -1].argmax(-1, keepdim=True)
            ours, theirs = [], []
            for _ in range(rounds):
                for _ in range(DECODE_RUN):
                    theirs.append(cpu_time(lambda: self.hf(step, cache=cache, logits_to_keep=1)))
                for _ in range(DECODE_RUN):
                    ours.append(cpu_time(self.bench.engine.step))
        self.bench.drain()
        return statistics.median(ours), statistics.median(theirs)


def compare_with_hf(bench: Bench, rounds: int) -> None:
    torch.set_num_threads(1)
    comparison = HFComparison(bench)
    comparison.prefill(1)  # warm-up
    prefill_ours, prefill_hf = comparison.prefill(rounds)
    decode_ours, decode_hf = comparison.decode(rounds)
    batch = comparison.batch
    print(f"\nvs Hugging Face transformers {_hf_version()} (SDPA), same weights, 1 thread, ")
    print(f"CPU time, median of {rounds} paired rounds:")
    print(f"{'measure':<44} {'kvroute':>12} {'HF':>12} {'ratio':>8}")
    print(
        f"{'prefill tokens/s (2,048-token prompt)':<44} {2048 / prefill_ours:>12,.0f} "
        f"{2048 / prefill_hf:>12,.0f} {prefill_hf / prefill_ours:>7.2f}x"
    )
    print(
        f"{f'decode tokens/s (batch {batch}, ~512 tokens)':<44} {batch / decode_ours:>12,.0f} "
        f"{batch / decode_hf:>12,.0f} {decode_hf / decode_ours:>7.2f}x"
    )
    print("  (target: both ratios >= 0.9)")


def _hf_version() -> str:
    import transformers

    return str(transformers.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds against HF")
    parser.add_argument("--hf-only", action="store_true", help="only part 4")
    args = parser.parse_args()
    config = settings(args.config)
    bench = Bench(config, args.repeats)
    m = config.model
    print(
        f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
        f"{len(m.groups)} KV cache groups ({', '.join(g.dtype for g in m.groups)} K/V), "
        f"vocab {m.vocab_size}, {m.dtype}; device {bench.executor.device}; {os.cpu_count()} "
        f"CPUs, load average {os.getloadavg()[0]:.1f} (threads compete with other processes)"
    )
    if args.hf_only:
        compare_with_hf(bench, args.rounds)
        return
    steps = tqdm(total=5, desc="benchmark", unit="part")
    torch.set_num_threads(1)
    bench.prefill_step(256)  # warm-up
    speed, base, per_seq, rows = bench.fit()
    steps.update()
    throughput = {}
    bench.clock = time.perf_counter  # 2 threads' CPU time would add up, not speed up
    for threads in (1, 2):
        torch.set_num_threads(threads)
        prefill = 2048 / bench.median(lambda: bench.prefill_step(2048))
        decode = 32 / bench.median(lambda: bench.decode_step(32))
        throughput[threads] = (prefill, decode)
        steps.update()
    torch.set_num_threads(1)
    bench.clock = time.process_time
    ttfts = [bench.hit_ttft(f) for f in (0.0, 0.5, 0.9)]
    steps.update()
    paged = ttfts[0][1]
    dense = bench.dense_prefill()
    steps.update()
    steps.close()

    print(f"\nmeasured steps (1 thread, CPU time, median of {args.repeats}):")
    for label, t in rows:
        print(f"  {label:<14} {t * 1000:8.1f} ms")
    print("\nfitted cost model (replicas.cost for the simulated executor):")
    print(f"  prefill_tokens_per_s: {speed:.0f}")
    print(f"  step_base_s: {base:.4f}")
    print(f"  decode_s_per_seq: {per_seq:.5f}")
    print(f"\n{'measure (wall time)':<44} {'1 thread':>12} {'2 threads':>12}")
    print(f"{'prefill tokens/s (2,048-token prompt)':<44}", end="")
    print(f" {throughput[1][0]:>12,.0f} {throughput[2][0]:>12,.0f}")
    print(f"{'decode tokens/s (32 seqs x ~512 tokens)':<44}", end="")
    print(f" {throughput[1][1]:>12,.0f} {throughput[2][1]:>12,.0f}")
    print(f"\n{'TTFT, 4,096-token prompt (1 thread)':<44} {'hit tokens':>12} {'TTFT':>12}")
    for (hit, t), label in zip(ttfts, ("0%", "50%", "90%"), strict=True):
        print(f"{'  ' + label + ' prefix hit':<44} {hit:>12,} {t * 1000:>10.1f}ms")
    print(f"  90% hit cuts TTFT {paged / ttfts[2][1]:.1f}x (target >= 5x)")
    print(f"\n{'prefill of 4,096 tokens (1 thread)':<44} {'time':>12}")
    print(f"{'  paged (engine step, no hit)':<44} {paged * 1000:>10.1f}ms")
    print(f"{'  dense reference (no cache)':<44} {dense * 1000:>10.1f}ms")
    print(f"  paged / dense = {paged / dense:.2f} (target <= 1.5)")
    compare_with_hf(bench, args.rounds)


if __name__ == "__main__":
    main()
