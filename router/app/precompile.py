"""Compile every numba kernel the router runs, into numba's on-disk cache.

`make install` runs this once, so neither a router's start nor a test pays the
compilation: cold, the kernels take half a minute or more on two cores (the event
scan alone about 20 s), warm they load in well under a second. A router compiles
(or loads) them at start-up either way, never in a request or an event batch.

Run: python -m kvroute.router.app.precompile
"""

from __future__ import annotations

import time

from kvroute.router.core import Router, RouterSettings
from kvroute.router.policy import KVAware


def precompile() -> None:
    """A Router in tokens mode with kv_aware: its start-up compiles the router's own
    hash chain, the block table, the prefix scan, the event scan and batch apply,
    and the policy's tie-break."""
    settings = RouterSettings(
        hash_algo="xxh64_tokens",
        hash_seed="precompile",
        hash_block_size=16,
        prediction_ttl_s=1.0,
        reuse_memory=0.0,
        cluster_blocks=1,
        max_retries=0,
        max_requests_per_replica=None,
        max_queued_prefill_tokens=None,
    )
    Router(settings, KVAware())


def main() -> None:
    started = time.perf_counter()
    print("compiling the router's kernels (numba; once per install) ...", flush=True)
    precompile()
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
