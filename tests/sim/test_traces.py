"""The Mooncake loader: fields, segments, arrival times, errors; the real conversation trace."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kvroute.benchmarks.sim.traces import TRACE_DIR, load_mooncake, trace_path
from kvroute.benchmarks.sim.workload import ContentBlock

RECORDS = [
    {"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]},
    {"timestamp": 1500, "input_length": 512, "output_length": 3, "hash_ids": [0]},
    {"timestamp": 3000, "input_length": 1025, "output_length": 7, "hash_ids": [0, 1, 2]},
]


def write_trace(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def small_trace(tmp_path: Path) -> Path:
    return write_trace(tmp_path / "tiny_trace.jsonl", [json.dumps(r) for r in RECORDS])


def test_loader_turns_each_line_into_an_open_loop_request(small_trace: Path) -> None:
    workload = load_mooncake(small_trace)
    assert workload.name == "tiny"
    assert [r.request_id for r in workload.requests] == ["tiny-0", "tiny-1", "tiny-2"]
    assert [r.arrival_s for r in workload.requests] == [0.0, 1.5, 3.0]
    assert [r.max_tokens for r in workload.requests] == [10, 3, 7]
    assert [r.num_tokens for r in workload.requests] == [1000, 512, 1025]
    assert workload.requests[0].prompt.segments == (ContentBlock(0, 512), ContentBlock(1, 488))
    assert workload.requests[2].prompt.segments[-1] == ContentBlock(2, 1)


def test_equal_hash_ids_give_equal_tokens(small_trace: Path) -> None:
    first, second, third = (r.token_ids() for r in load_mooncake(small_trace).requests)
    assert first[:512] == second == third[:512]
    assert first[512:1000] == third[512:1000]
    assert first[:488] != first[512:1000]


def test_gzip_trace_loads_like_the_plain_file(small_trace: Path, tmp_path: Path) -> None:
    packed = tmp_path / "tiny_trace.jsonl.gz"
    packed.write_bytes(gzip.compress(small_trace.read_bytes()))
    plain, unpacked = load_mooncake(small_trace), load_mooncake(packed)
    assert unpacked.name == "tiny"
    assert [r.token_ids() for r in unpacked.requests] == [r.token_ids() for r in plain.requests]
    assert [r.arrival_s for r in unpacked.requests] == [0.0, 1.5, 3.0]


def test_speed_compresses_arrivals_and_limit_keeps_the_first_requests(small_trace: Path) -> None:
    workload = load_mooncake(small_trace, speed=2.0, limit=2)
    assert [r.arrival_s for r in workload.requests] == [0.0, 0.75]


def test_block_tokens_sets_the_size_each_id_covers(tmp_path: Path) -> None:
    record = {"timestamp": 0, "input_length": 40, "output_length": 1, "hash_ids": [4, 5, 6]}
    path = write_trace(tmp_path / "t.jsonl", [json.dumps(record)])
    prompt = load_mooncake(path, block_tokens=16).requests[0].prompt
    assert prompt.segments == (ContentBlock(4, 16), ContentBlock(5, 16), ContentBlock(6, 8))


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1])])
    assert len(load_mooncake(path).requests) == 2


def test_missing_file_error_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"looked for {missing}"):
        load_mooncake(missing)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "malformed trace record"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids"),
        (
            '{"timestamp": 0, "input_length": 1000, "output_length": 1, "hash_ids": [0]}',
            "expected ceil",
        ),
        ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}', ">= 1"),
        ('{"timestamp": 0, "input_length": 10, "output_length": "x", "hash_ids": [0]}', "int"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [-3]}', "outside"),
    ],
)
def test_malformed_line_error_names_file_and_line(
    tmp_path: Path, bad_line: str, message: str
) -> None:
    path = write_trace(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), bad_line])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        load_mooncake(path)


def test_non_positive_speed_is_refused(small_trace: Path) -> None:
    with pytest.raises(ValueError, match="speed"):
        load_mooncake(small_trace, speed=0)


def test_known_names_resolve_to_the_bundled_compressed_traces() -> None:
    assert trace_path("conversation") == (TRACE_DIR / "conversation_trace.jsonl.gz").resolve()
    assert trace_path("conversation").parent.name == "traces"
    assert trace_path("conversation").parent.parent.name == "data"


def test_real_conversation_trace_has_12031_requests_and_its_first_record() -> None:
    workload = load_mooncake("conversation")
    assert len(workload.requests) == 12_031
    first = workload.requests[0]
    assert (first.request_id, first.arrival_s, first.num_tokens, first.max_tokens) == (
        "conversation-0",
        0.0,
        6758,
        500,
    )
    assert [s.block_id for s in first.prompt.segments] == list(range(14))
    assert first.prompt.segments[-1] == ContentBlock(13, 6758 - 13 * 512)
    assert workload.total_prompt_tokens == 144_793_823


def test_missing_named_trace_error_names_the_traces_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvroute.benchmarks.sim.traces.TRACE_DIR", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=f"looked for {tmp_path}/conversation_trace.jsonl.gz"
    ):
        load_mooncake("conversation")
