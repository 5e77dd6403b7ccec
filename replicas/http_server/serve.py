"""`kvroute serve-replica`: one replica engine as a standalone, vLLM-like server.

No Ray: the engine runs in this process behind `replica_http` (vLLM's OpenAI
server shapes), and its KV events go out over ZeroMQ in vLLM's wire format,
configured by vLLM's `--kv-events-config` JSON (`events/kv_events_config.py`).

The hash chain's root is vLLM's unless the config pins it: `hashing.seed` when
the YAML sets it, else `hash_fn(PYTHONHASHSEED)` when that variable is set,
else 32 random bytes (`init_none_hash`, vLLM's rule), so this replica's block
hashes equal a vLLM engine's that runs with the same PYTHONHASHSEED and hash
algorithm.

Imported lazily by the CLI (it pulls in torch through the engine).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import yaml
from aiohttp import web

from kvroute.events.curve import CurveServerConfig, read_key_pair, read_public_keys
from kvroute.events.hashing import get_hash_fn_by_name
from kvroute.events.kv_events_config import KVEventsConfig, KVEventsConfigError, publisher_config
from kvroute.events.publisher import ZmqEventPublisher
from kvroute.replicas.clock import RealClock
from kvroute.replicas.config import ReplicaSettings
from kvroute.replicas.factory import build_engine
from kvroute.replicas.http_server.app import build_replica_app
from kvroute.replicas.http_server.backend import ServedModel
from kvroute.replicas.kv_cache.utils import BlockHash, init_none_hash
from kvroute.replicas.serving import ReplicaCore
from kvroute.router.openai.chat import ChatTemplate
from kvroute.router.openai.tokenizer import load_tokenizer, tokenizer_file


@dataclass(frozen=True)
class ServeOptions:
    """The command line of `kvroute serve-replica`, parsed."""

    host: str = "127.0.0.1"
    port: int = 8100
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    rank: int = 0
    served_model_name: str | None = None
    enable_prompt_tokens_details: bool = True
    allow_insecure_events: bool = False
    curve_secret_key_file: str | None = None
    curve_client_keys_file: str | None = None


def pinned_hash_seed(config_path: str | Path) -> str | None:
    """`hashing.seed` when the YAML file sets it (None when the default would apply)."""
    data = yaml.safe_load(Path(config_path).read_text()) or {}
    hashing = data.get("hashing") if isinstance(data, dict) else None
    seed = hashing.get("seed") if isinstance(hashing, dict) else None
    return seed if isinstance(seed, str) else None


def hash_root(algo: str, pinned_seed: str | None) -> tuple[BlockHash, str]:
    """The root of every block-hash chain and where it came from: the pinned seed,
    else vLLM's `init_none_hash` (PYTHONHASHSEED, else random)."""
    hash_fn = get_hash_fn_by_name(algo)
    if pinned_seed is not None:
        return BlockHash(hash_fn(pinned_seed)), "hashing.seed in the config"
    root = init_none_hash(hash_fn)
    if os.getenv("PYTHONHASHSEED") is not None:
        return root, "PYTHONHASHSEED"
    return root, "random (set PYTHONHASHSEED to share hashes across processes)"


def curve_config(options: ServeOptions) -> CurveServerConfig | None:
    """The event sockets' CURVE settings from the key files (None: no CURVE)."""
    if options.curve_secret_key_file is None:
        if options.curve_client_keys_file is not None:
            raise KVEventsConfigError(
                "--curve-client-keys-file needs --curve-secret-key-file (the replica's key)"
            )
        return None
    keys = read_key_pair(options.curve_secret_key_file)
    clients = (
        read_public_keys(options.curve_client_keys_file)
        if options.curve_client_keys_file is not None
        else None
    )
    return CurveServerConfig(keys, clients)


class ReplicaProcess:
    """What one serve-replica process runs: the engine loop, the event publisher
    and the HTTP server. `start` binds everything (a busy port fails there);
    `stop` aborts what is in flight, closes the publisher and the server."""

    def __init__(
        self, settings: ReplicaSettings, options: ServeOptions, pinned_seed: str | None
    ) -> None:
        self.settings = settings
        self.options = options
        self.curve = curve_config(options)
        self.publisher_config = publisher_config(
            options.kv_events,
            data_parallel_rank=options.rank,
            curve=self.curve,
            allow_insecure=options.allow_insecure_events,
        )
        self.hash_root, self.hash_source = hash_root(settings.hashing.algo, pinned_seed)
        model = settings.model
        if settings.replicas.executor == "torch":
            import torch

            torch.set_num_threads(settings.replicas.threads)
        self.engine = build_engine(
            settings,
            RealClock(),
            seed_offset=options.rank,
            events=options.kv_events.enable_kv_cache_events,
            log_stats=True,
            none_hash=self.hash_root,
            data_parallel_rank=options.rank,
        )
        self.core = ReplicaCore(
            f"replica-{options.rank}",
            self.engine,
            tuple(model.lora_names),
            step_in_thread=settings.replicas.executor == "torch",
        )
        self.served = ServedModel(
            name=options.served_model_name or model.name,
            root=model.path or model.name,
            limits=self.engine.limits,
            eos_token_ids=self.engine.config.eos_token_ids,
            engine_index=options.rank,
            enable_prompt_tokens_details=options.enable_prompt_tokens_details,
        )
        self.tokenizer = load_tokenizer(tokenizer_file(model.tokenizer, model.path))
        self.template = ChatTemplate.for_model(model.path)
        self.publisher: ZmqEventPublisher | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Bind the event sockets and the HTTP port, then serve; returns the URL."""
        if self.publisher_config is not None:
            self.publisher = ZmqEventPublisher(self.publisher_config)
        try:
            self.core.start(self.publisher)
            app = build_replica_app(self.core, self.served, self.tokenizer, self.template)
            # handler_cancellation: a client that disconnects cancels its handler,
            # which aborts its request in the engine.
            self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.options.host, self.options.port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        sockets = site._server.sockets if site._server else []
        port = sockets[0].getsockname()[1] if sockets else self.options.port
        host = self.options.host
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Abort every request, stop the loop and the publisher, close the server."""
        await self.core.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def describe_events(self) -> str:
        """One line: where the events go (or that they are off)."""
        if self.publisher is None:
            return "KV events: not published (--kv-events-config publisher is null)"
        replay = self.publisher.replay_endpoint or "none"
        security = "CURVE" if self.curve is not None else "no CURVE"
        topic = self.options.kv_events.topic
        return (
            f"KV events: {self.publisher.endpoint} (replay {replay}, topic {topic!r}, "
            f"{security}, rank {self.options.rank})"
        )


def replica_settings(config_settings: ReplicaSettings, executor: str | None) -> ReplicaSettings:
    """The config's replica settings, with `--executor` applied."""
    if executor is None:
        return config_settings
    replicas = msgspec.structs.replace(config_settings.replicas, executor=executor)
    return msgspec.structs.replace(config_settings, replicas=replicas)


async def serve(process: ReplicaProcess, stop: asyncio.Event) -> None:
    """Serve until `stop` is set (the CLI sets it on SIGTERM or SIGINT)."""
    try:
        await stop.wait()
    finally:
        await process.stop()
