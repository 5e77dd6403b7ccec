"""benchmarks.vllm_launch without vLLM: the checkpoint it writes loads in transformers
and tokenizes as the routers do, the servers' command lines and environments, the
router config the peers harness builds for them, and the failure paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvroute.benchmarks.peers.__main__ import full_attention_only
from kvroute.benchmarks.peers.fleet import ENGINE_TOKENS, VLLM_MODEL, VLLM_OPTIONS, vllm_config
from kvroute.benchmarks.peers.workloads import GENERATORS, Scale, build
from kvroute.benchmarks.vllm_launch import (
    ServerOptions,
    TinyLlama,
    plan_servers,
    vllm_version,
    wait_healthy,
)
from kvroute.router.config import parse_config
from kvroute.router.openai.tokenizer import ByteTokenizer, HFTokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TEXT = "[tenant 3] Q: a,b;c  d\x01 é"


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_byte_checkpoint_loads_and_tokenizes_one_token_per_byte(tmp_path: Path) -> None:
    TinyLlama(tokenizer="bytes", max_len=640).write(tmp_path, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == 256
    assert model.config.max_position_embeddings == 640
    assert model.config.num_key_value_heads * model.config.head_dim == 64
    ids = list(TEXT.encode())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert tuple(logits.shape) == (1, len(ids), 256)
    # vLLM's tokenizer (transformers'), kvroute's for the file, and kvroute's byte
    # tokenizer agree: id = byte value, no special tokens added, round-trips.
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(TEXT) == ids
    assert hf.decode(ids) == TEXT
    from_file = HFTokenizer(tmp_path / "tokenizer.json")
    assert from_file.encode(TEXT) == ids == ByteTokenizer().encode(TEXT)
    assert from_file.decode(ids) == TEXT


def test_word_checkpoint_maps_words_to_their_ids(tmp_path: Path) -> None:
    TinyLlama(tokenizer="words").write(tmp_path, seed=0)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode("w5 w511 w3", add_special_tokens=False) == [5, 511, 3]
    assert hf.encode("unknown", add_special_tokens=False) == [0]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == 512


def test_an_unknown_tokenizer_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="tokenizer 'chars'"):
        TinyLlama(tokenizer="chars")


def test_the_peers_kv_memory_holds_the_engine_tokens_the_workloads_assume() -> None:
    # K and V, 2 layers, 2 heads of 32 floats: 1 KiB a token.
    assert VLLM_MODEL.kv_bytes_per_token == 1024
    assert VLLM_OPTIONS.kv_cache_bytes == ENGINE_TOKENS * 1024 == 4 * 1024 * 1024


def test_servers_get_distinct_ports_seeds_and_bound_event_endpoints(tmp_path: Path) -> None:
    servers = plan_servers(3, tmp_path, prefix="vllm")
    assert [s.name for s in servers] == ["vllm-1", "vllm-2", "vllm-3"]
    assert [s.seed for s in servers] == ["1", "2", "3"]
    ports = {p for s in servers for p in (s.port, s.replay_port, int(s.events.rsplit(":", 1)[1]))}
    assert len(ports) == 9
    for server in servers:
        # vLLM binds `tcp://*:PORT`; the router connects to loopback on that port.
        port = server.events.removeprefix("tcp://*:")
        assert server.subscribe == f"tcp://127.0.0.1:{port}"
        assert server.log == tmp_path / f"{server.name}.log"
    first = plan_servers(2, tmp_path, ipc_first=True)[0]
    assert first.events == first.subscribe == f"ipc://{tmp_path}/events-1.sock"


def test_the_command_carries_caching_events_and_the_kv_budget(tmp_path: Path) -> None:
    server = plan_servers(1, tmp_path)[0]
    checkpoint = tmp_path / "ckpt"
    options = ServerOptions(
        model="m", max_len=2560, max_num_seqs=16, kv_cache_bytes=4096, scale_out=True
    )
    command = server.command("/venv/bin/python", checkpoint, options)
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _option(command, "--model") == str(checkpoint)
    assert _option(command, "--served-model-name") == "m"
    assert _option(command, "--port") == str(server.port)
    assert _option(command, "--block-size") == "32"
    assert _option(command, "--max-model-len") == "2560"
    assert _option(command, "--max-num-seqs") == "16"
    assert _option(command, "--max-num-batched-tokens") == "2560"  # defaults to max_len
    assert _option(command, "--kv-cache-memory-bytes") == "4096"
    assert _option(command, "--prefix-caching-hash-algo") == "sha256"
    assert "--enable-prefix-caching" in command and "--enable-scale-out" in command
    assert json.loads(_option(command, "--kv-events-config")) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": server.events,
        "replay_endpoint": f"tcp://127.0.0.1:{server.replay_port}",
        "topic": "kv",
    }
    defaults = ServerOptions(model="m", max_len=512)
    default = server.command("python", checkpoint, defaults)
    assert "--kv-cache-memory-bytes" not in default and "--enable-scale-out" not in default
    assert _option(default, "--max-num-batched-tokens") == "512"


def test_an_explicit_kv_budget_is_not_overridden_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override --kv-cache-memory-bytes.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    server = plan_servers(1, tmp_path)[0]
    env = server.environment(ServerOptions(model="m", max_len=512, kv_cache_bytes=4096))
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert env["PYTHONHASHSEED"] == "1" and env["VLLM_SERVER_DEV_MODE"] == "1"
    default = server.environment(ServerOptions(model="m", max_len=512))
    assert default["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_external_entries_are_tokens_mode_unless_the_seed_is_the_routers(tmp_path: Path) -> None:
    one, two = plan_servers(2, tmp_path)
    assert "hash_mode" not in two.external_entry("1")
    assert "hash_mode" not in one.external_entry()
    seeded = one.external_entry("1")
    assert (seeded["hash_mode"], seeded["hash_seed"], seeded["hash_dialect"]) == (
        "seeded",
        "1",
        "tagged",
    )
    assert seeded["events"]["endpoint"] == one.subscribe


def test_the_peers_router_config_for_vllm_is_a_valid_kvroute_config(tmp_path: Path) -> None:
    data = vllm_config(tmp_path)
    data["external"] = [s.external_entry() for s in plan_servers(3, tmp_path)]
    config = parse_config(data, "test")
    assert config.model.block_size == 32
    assert config.model.tokenizer == str(tmp_path / "tokenizer.json")
    assert config.model.vocab_size == 256
    assert [e.name for e in config.external] == ["engine-1", "engine-2", "engine-3"]


def test_vllm_runs_full_attention_workloads_only() -> None:
    scale = Scale(requests=6, sessions=2, engine_tokens=ENGINE_TOKENS, engines=3)
    every = build(list(GENERATORS), scale, seed=0)
    assert [w.name for w in full_attention_only(every, explicit=False)] == [
        "tenants",
        "chat",
        "agentic",
        "pressure",
    ]
    with pytest.raises(ValueError, match="full attention only; drop hybrid"):
        full_attention_only(every, explicit=True)
    # Every full-attention prompt fits the vLLM engines' context.
    longest = max(len(p) for w in every if w.layout == "full" for s in w.sessions for p in s)
    assert longest + scale.max_tokens <= VLLM_MODEL.max_len


def test_a_python_without_vllm_is_named_with_the_fix() -> None:
    with pytest.raises(SystemExit, match="cannot import vllm; build its venv: make vllm-e2e"):
        vllm_version(sys.executable)
    with pytest.raises(SystemExit, match="cannot run it"):
        vllm_version("/nonexistent/python")


def test_a_server_that_exits_while_starting_fails_with_its_log(tmp_path: Path) -> None:
    server = plan_servers(1, tmp_path)[0]
    server.log.write_text("ValueError: --kv-cache-memory-bytes is too small\n")
    server.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    server.process.wait(timeout=30)
    with pytest.raises(RuntimeError, match="engine-1 exited while starting:\nValueError"):
        wait_healthy([server], deadline_s=30)
