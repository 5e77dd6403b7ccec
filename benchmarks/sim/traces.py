"""Mooncake (FAST'25) request traces, shipped gzip-compressed in `benchmarks/data/traces/`.

Each line is one request: `timestamp` (ms from the start), `input_length`, `output_length`,
`hash_ids`: one id per 512-token block of the prompt, prefix-chained, the last id covering
the partial block. Each id becomes a `ContentBlock`, so equal ids give equal tokens and the
trace's sharing survives at any engine block size; the last id's block holds
input_length - 512 * (n - 1) tokens, a prefix of what the same id holds elsewhere.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import BinaryIO

import msgspec

from kvroute.benchmarks.sim.workload import (
    DEFAULT_VOCAB_SIZE,
    ContentBlock,
    PromptSpec,
    SimRequest,
    Workload,
)

TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"
TRACE_FILES = {
    "conversation": "conversation_trace.jsonl.gz",
    "synthetic": "synthetic_trace.jsonl.gz",
}


class MooncakeRecord(msgspec.Struct):
    """One trace line; unknown fields are ignored."""

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def trace_path(name_or_path: str | Path) -> Path:
    """A trace's file: a known name ("conversation", "synthetic") under TRACE_DIR, or a path
    to a `.jsonl` or `.jsonl.gz` file."""
    if isinstance(name_or_path, str) and name_or_path in TRACE_FILES:
        path = (TRACE_DIR / TRACE_FILES[name_or_path]).resolve()
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Mooncake trace {str(name_or_path)!r} not found: looked for {path} "
            f"(known names {sorted(TRACE_FILES)} live in {TRACE_DIR.resolve()})"
        )
    return path


def load_mooncake(
    name_or_path: str | Path,
    *,
    speed: float = 1.0,
    limit: int | None = None,
    block_tokens: int = 512,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Workload:
    """The trace as an open-loop workload; arrival_s = timestamp / 1000 / speed.

    `limit` keeps the first requests only. Raises FileNotFoundError naming where it looked,
    and ValueError naming the file and line of a malformed record.
    """
    if speed <= 0:
        raise ValueError(f"speed {speed} must be positive")
    if limit is not None and limit < 0:
        raise ValueError(f"limit {limit} must not be negative")
    path = trace_path(name_or_path)
    name = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix("_trace")
    decoder = msgspec.json.Decoder(MooncakeRecord)
    requests: list[SimRequest] = []
    with _open_lines(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = decoder.decode(line)
                prompt = _prompt(record, block_tokens, vocab_size)
            except (msgspec.DecodeError, ValueError) as exc:
                raise ValueError(f"{path}:{line_number}: malformed trace record: {exc}") from exc
            requests.append(
                SimRequest(
                    request_id=f"{name}-{len(requests)}",
                    prompt=prompt,
                    max_tokens=record.output_length,
                    arrival_s=record.timestamp / 1000 / speed,
                )
            )
    return Workload(
        name=name,
        requests=requests,
        description=f"Mooncake {name} trace from {path} at {speed:g}x speed",
        vocab_size=vocab_size,
    )


def _open_lines(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when its name ends in `.gz`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _prompt(record: MooncakeRecord, block_tokens: int, vocab_size: int) -> PromptSpec:
    length, ids = record.input_length, record.hash_ids
    if length < 1 or record.output_length < 1 or record.timestamp < 0:
        raise ValueError("input_length and output_length must be >= 1, timestamp >= 0")
    if len(ids) != math.ceil(length / block_tokens):
        raise ValueError(
            f"{len(ids)} hash_ids for input_length {length}; "
            f"expected ceil({length} / {block_tokens}) = {math.ceil(length / block_tokens)}"
        )
    last = length - block_tokens * (len(ids) - 1)
    segments = [ContentBlock(i, block_tokens) for i in ids[:-1]]
    segments.append(ContentBlock(ids[-1], last))
    return PromptSpec(tuple(segments), vocab_size)
