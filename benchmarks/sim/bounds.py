"""Upper bounds on the token hit rate any router can reach on a workload.

Common model. The workload's requests are looked up one at a time in processing order
(`Workload.in_processing_order`: arrival order, or list order for a closed-loop workload),
and each inserts its prompt's full blocks (`block_runs`) before the next lookup. A lookup
hits the longest cached prefix of full blocks, capped as the engine caps it: at most the
full blocks of num_tokens - 1 tokens, so a block-aligned prompt's last block is inserted
but never hit. Hits are counted in blocks and reported in tokens (blocks x block_size).

Work is done per run of blocks (a 512-token trace id is one run of 32 blocks at size 16),
never per block: within a run, blocks share recency and future, so a run is a counted
interval, split only where its blocks' fates differ.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

from kvroute.benchmarks.sim.workload import BlockRun, Workload, block_runs


@dataclass(frozen=True)
class HitRateBound:
    """Hit tokens out of all prompt tokens (partial blocks included in the total)."""

    hit_tokens: int
    prompt_tokens: int

    @property
    def rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class _Lookup:
    runs: list[BlockRun]
    hittable: int  # full blocks of num_tokens - 1: the most a hit may cover


def infinite_cache_hit_rate(workload: Workload, block_size: int) -> HitRateBound:
    """Every block ever inserted stays cached."""
    lookups, prompt_tokens = _lookups(workload, block_size)
    leading: dict[int, int] = {}  # run key -> blocks cached from its start
    hit_blocks = 0
    for lookup in lookups:
        hit_blocks += min(_cached_prefix(lookup.runs, leading), lookup.hittable)
        for key, count in lookup.runs:
            if leading.get(key, 0) < count:
                leading[key] = count
    return HitRateBound(hit_blocks * block_size, prompt_tokens)


class _LruRun:
    """Blocks [lo, hi) of one run key, touched at the same time."""

    __slots__ = ("hi", "key", "lo")

    def __init__(self, key: int, lo: int, hi: int) -> None:
        self.key, self.lo, self.hi = key, lo, hi


def pooled_lru_hit_rate(workload: Workload, block_size: int, capacity_blocks: int) -> HitRateBound:
    """One LRU cache of `capacity_blocks` shared by all replicas, with no duplication.

    After its lookup a request touches its blocks deepest first, so its first block is the
    most recent and its deepest the first evicted: vLLM frees a finished request's blocks
    tail first into the free queue it evicts from. Parents are thus always more recent than
    their children and the cache stays prefix-closed; a run key's cached blocks are
    [0, leading[key]), split into intervals of equal recency, deeper ones older.
    """
    _check_capacity(capacity_blocks)
    lookups, prompt_tokens = _lookups(workload, block_size)
    recency: OrderedDict[int, _LruRun] = OrderedDict()  # interval id -> interval, oldest first
    intervals: dict[int, list[int]] = {}  # run key -> its interval ids, shallowest first
    leading: dict[int, int] = {}
    size = 0
    next_id = 0
    hit_blocks = 0
    for lookup in lookups:
        hit_blocks += min(_cached_prefix(lookup.runs, leading), lookup.hittable)
        for key, count in reversed(lookup.runs):
            kept = []
            for interval_id in intervals.get(key, ()):
                interval = recency[interval_id]
                if interval.hi <= count:
                    del recency[interval_id]
                    continue
                interval.lo = max(interval.lo, count)
                kept.append(interval_id)
            recency[next_id] = _LruRun(key, 0, count)
            intervals[key] = [next_id, *kept]
            next_id += 1
            cached = leading.get(key, 0)
            if count > cached:
                size += count - cached
                leading[key] = count
        while size > capacity_blocks:
            interval_id, interval = next(iter(recency.items()))
            evicted = min(size - capacity_blocks, interval.hi - interval.lo)
            interval.hi -= evicted
            size -= evicted
            leading[interval.key] = interval.hi
            if interval.hi == interval.lo:
                del recency[interval_id]
                remaining = intervals[interval.key]
                remaining.pop()  # the oldest interval of a key is its deepest
                if not remaining:
                    del intervals[interval.key], leading[interval.key]
    return HitRateBound(hit_blocks * block_size, prompt_tokens)


class _Piece:
    """Cached blocks [lo, hi) of one run key that share their next use."""

    __slots__ = ("alive", "hi", "key", "lo", "next_use")

    def __init__(self, key: int, lo: int, hi: int, next_use: int) -> None:
        self.key, self.lo, self.hi, self.next_use = key, lo, hi, next_use
        self.alive = True


class _Future:
    """Each run key's occurrences in processing order, to find its blocks' next uses."""

    def __init__(self, lookups: list[_Lookup]) -> None:
        self.times: dict[int, list[int]] = {}
        self.counts: dict[int, list[int]] = {}
        self.hittable: dict[int, list[int]] = {}
        self.depth: dict[int, int] = {}  # blocks before the run: the same wherever it occurs
        self.positions: list[list[int]] = []  # per lookup and run: index among the key's
        for time, lookup in enumerate(lookups):
            depth = 0
            positions = []
            for key, count in lookup.runs:
                times = self.times.setdefault(key, [])
                positions.append(len(times))
                times.append(time)
                self.counts.setdefault(key, []).append(count)
                self.hittable.setdefault(key, []).append(
                    min(count, max(0, lookup.hittable - depth))
                )
                self.depth[key] = depth
                depth += count
            self.positions.append(positions)
        self.wider: dict[int, list[int]] = {k: _next_greater(c) for k, c in self.counts.items()}

    def pieces_after(self, key: int, position: int, count: int) -> list[_Piece]:
        """Blocks [0, count) of `key` after its occurrence `position`, split by next use.

        A block's next use is its next appearance if that appearance can hit it; if it
        appears first where it cannot hit (past the cap), it is re-inserted there for free
        and holding it until then is worthless, so it gets no piece (it is dropped), nor
        does a block that never appears again.
        """
        times, counts, hittable = self.times[key], self.counts[key], self.hittable[key]
        wider = self.wider[key]
        pieces = []
        covered = 0
        j = position + 1
        while covered < count and j < len(times):
            top = min(counts[j], count)
            usable = min(max(covered, hittable[j]), top)
            if usable > covered:
                pieces.append(_Piece(key, covered, usable, times[j]))
            covered = counts[j]
            j = wider[j]
        return pieces


def belady_hit_rate(workload: Workload, block_size: int, capacity_blocks: int) -> HitRateBound:
    """The pooled cache of `capacity_blocks` with optimal offline eviction, prefix hits only.

    After each request, of the cached blocks and the request's own, keep those whose next
    use is nearest; evict the farthest first, ties deeper first. Farthest-next-use is
    optimal for plain hits (Belady's exchange argument: swapping a block needed sooner for
    one needed later never loses a hit); a block next seen where it cannot hit is
    re-inserted there for free, so it counts as not needed until then. A parent appears in
    every request its child appears in, so after the last request that brought both it is
    needed no later than the child, and the tie rule evicts the child first: every prefix a
    request looks up is cached prefix-closed, so prefix hits equal plain hits and no cache
    policy of this size does better (checked against exhaustive search in the tests).

    No router beats it: R replicas of C blocks hold at most R x C distinct blocks; a
    replica hits only a prefix it holds, which the union of all replicas then holds too;
    and blocks enter caches only with a request that contains them. So the union is a
    feasible schedule for this pooled cache, with at most its hits. This assumes requests
    are looked up in processing order and insert their blocks before the next lookup: a
    real engine inserts later, which only loses hits, but a request served out of arrival
    order could, at the margin, hit blocks of a later arrival.
    """
    _check_capacity(capacity_blocks)
    lookups, prompt_tokens = _lookups(workload, block_size)
    future = _Future(lookups)
    pieces: dict[int, list[_Piece]] = {}  # run key -> its cached pieces by lo
    leading: dict[int, int] = {}
    heap: list[tuple[int, int, int, _Piece]] = []  # (-next use, -depth, seq, piece); lazy
    size = 0
    seq = 0
    hit_blocks = 0
    for time, lookup in enumerate(lookups):
        hit_blocks += min(_cached_prefix(lookup.runs, leading), lookup.hittable)
        for (key, count), position in zip(lookup.runs, future.positions[time], strict=True):
            fresh = future.pieces_after(key, position, count)
            size += sum(piece.hi - piece.lo for piece in fresh)
            untouched = []
            for piece in pieces.get(key, ()):
                if piece.lo >= count:
                    untouched.append(piece)
                    continue
                piece.alive = False
                size -= piece.hi - piece.lo
                if piece.hi > count:  # blocks past this request keep their next use
                    fresh.append(_Piece(key, count, piece.hi, piece.next_use))
                    size += piece.hi - count
            depth = future.depth[key]
            for piece in fresh:
                heapq.heappush(heap, (-piece.next_use, -(depth + piece.lo), seq, piece))
                seq += 1
            _set_pieces(pieces, leading, key, fresh + untouched)
        while size > capacity_blocks:
            piece = heap[0][3]
            if not piece.alive:
                heapq.heappop(heap)
                continue
            evicted = min(size - capacity_blocks, piece.hi - piece.lo)
            piece.hi -= evicted
            size -= evicted
            remaining = pieces[piece.key]
            if piece.hi == piece.lo:
                piece.alive = False
                heapq.heappop(heap)
                remaining.remove(piece)
            _set_pieces(pieces, leading, piece.key, remaining)
    return HitRateBound(hit_blocks * block_size, prompt_tokens)


def _set_pieces(
    pieces: dict[int, list[_Piece]], leading: dict[int, int], key: int, kept: list[_Piece]
) -> None:
    if not kept:
        pieces.pop(key, None)
        leading.pop(key, None)
        return
    pieces[key] = kept
    covered = 0
    for piece in kept:
        if piece.lo != covered:
            break
        covered = piece.hi
    leading[key] = covered


def _next_greater(values: list[int]) -> list[int]:
    """For each index, the next index holding a strictly greater value (len if none)."""
    result = [len(values)] * len(values)
    stack: list[int] = []
    for i in range(len(values) - 1, -1, -1):
        while stack and values[stack[-1]] <= values[i]:
            stack.pop()
        if stack:
            result[i] = stack[-1]
        stack.append(i)
    return result


def _cached_prefix(runs: list[BlockRun], leading: dict[int, int]) -> int:
    """Full blocks of the longest cached prefix, given each run key's cached leading blocks."""
    prefix = 0
    for key, count in runs:
        cached = leading.get(key, 0)
        if cached < count:
            return prefix + cached
        prefix += count
    return prefix


def _lookups(workload: Workload, block_size: int) -> tuple[list[_Lookup], int]:
    requests = workload.in_processing_order()
    lookups = [
        _Lookup(block_runs(r.prompt, block_size), (r.num_tokens - 1) // block_size)
        for r in requests
    ]
    return lookups, sum(r.num_tokens for r in requests)


def _check_capacity(capacity_blocks: int) -> None:
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks {capacity_blocks} must not be negative")
