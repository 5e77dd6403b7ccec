"""Cluster configuration: YAML files in configs/ parsed into typed structs.

Unknown keys and wrong types are errors that name the offending path (msgspec
validation), so a typo never silently falls back to a default. The replica
sections are `replicas.config` structs; this module adds the router, the
cluster and the bundled workload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml

from kvroute.events.curve import read_public_keys
from kvroute.replicas.config import (
    LOOPBACK_HOSTS,
    EventsConfig,
    HashingConfig,
    ModelConfig,
    ReplicasConfig,
    ReplicaSettings,
    Struct,
)
from kvroute.replicas.model.kv_memory import resolve_model
from kvroute.router.index.dialect import HashDialect
from kvroute.router.index.predictions import DEFAULT_PREDICTION_TTL_S
from kvroute.router.policy import check_policy

Positive = Annotated[float, msgspec.Meta(gt=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]


class RouterConfig(Struct):
    policy: str = "kv_aware"
    policy_options: dict[str, Any] = msgspec.field(default_factory=dict)
    prediction_ttl_s: Positive = DEFAULT_PREDICTION_TTL_S
    # Eviction hints: remember this many times (replicas x model.num_blocks) prompt
    # blocks (0: no hints). Only replicas with `probation_fraction` use them.
    reuse_memory: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    max_retries: Annotated[int, msgspec.Meta(ge=0)] = 3
    # Replica actors push their load on their event socket each step it changes (and
    # a keepalive when idle); this poll of their load() only corrects and checks them.
    load_poll_s: Positive = 1.0
    # How requests reach replica actors: their ZeroMQ data plane (a frame per
    # request and per chunk, Ray kept for placement, load and snapshots) or Ray
    # actor calls (about a millisecond of CPU each across both ends).
    data_plane: Literal["zmq", "ray"] = "zmq"
    # External engines' /metrics are scraped this often: the router counts what it
    # sends and what finishes, so a scrape only corrects that (and each costs the
    # engine a Prometheus render).
    engine_load_poll_s: Positive = 1.0
    # Once the router has been quiet this long (nothing in flight, nothing ended),
    # it scrapes external engines' /metrics and checks their /health only this often
    # (router/service/probes.py): idle, they have nothing new to say.
    engine_quiet_probe_s: Positive = 10.0
    # A replica that does not report its load within this (a poll unanswered; for a
    # replica actor, neither push nor poll heard) is marked suspect and gets no new
    # requests until it does.
    load_timeout_s: Positive = 2.0
    # A stalled router must not mistake its own lateness for its replicas': a missed
    # load report makes a replica suspect only if the router's loop was late by less
    # than this meanwhile.
    loop_lag_tolerance_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    # A request with no first token after this long (a non-streamed one: no result,
    # and its replica suspect) is sent once to the next-best replica, the first
    # attempt aborted.
    first_token_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    # How often the router starts configured replicas that run but are not
    # registered (one that Ray restarted after a crash).
    supervise_s: Positive = 1.0
    # Routers in the tier. Each keeps a full index fed by every replica's event
    # stream and serves HTTP on its own port (http_port + i; 0: each a free one).
    count: AtLeastOne = 1
    # With several routers, each publishes its routing decisions on a ZeroMQ
    # channel (CURVE with the routers' key pair) and records its peers' as
    # predicted entries, so a burst of one prefix split over routers stays together.
    share_decisions: bool = True
    # A request that has not finished after this long is aborted on its replica and
    # answered with a 504; a request may ask for less with `timeout`.
    request_timeout_s: Positive = 600.0
    # External engines share one pool of at most this many HTTP connections.
    max_engine_connections: AtLeastOne = 256
    engine_connect_timeout_s: Positive = 5.0
    # Idle pooled connections to engines are closed after this: shorter than the
    # engines' own idle timeout (vLLM's uvicorn closes them after 5 s), so a request
    # never goes out on a connection the engine already closed.
    engine_keepalive_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 4.0
    # An external engine whose requests or health checks fail is suspect (no new
    # requests) at once; it leaves routing and the index only once it has failed
    # for this long without a success between.
    engine_failure_window_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    # An engine whose event stream carried nothing for this long while it served
    # requests is flagged (`events_silent` in /status) and logged once.
    engine_events_silence_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # Admission control: past either limit a replica takes no more requests; with
    # every replica past it, the router answers 429 with Retry-After.
    max_requests_per_replica: AtLeastOne = 256
    max_queued_prefill_tokens: AtLeastOne = 1 << 20
    # The HTTP front door: bodies are limited while they are read and must arrive
    # within body_timeout_s. With api_keys_file (one key a line) or api_keys_env (a
    # variable holding comma-separated keys), /v1/* needs `Authorization: Bearer`.
    max_body_bytes: AtLeastOne = 4 * 1024 * 1024
    # A completions batch of more prompts than this is a 400 naming `prompt`, before
    # anything is dispatched.
    max_prompts_per_request: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 256
    body_timeout_s: Positive = 30.0
    # Against slowloris and connection floods: a request's headers must arrive within
    # header_timeout_s (else 408 and close); past max_connections open connections, a
    # new one is answered 503 and closed. Idle keep-alive connections count too, so
    # they are closed after keepalive_timeout_s.
    header_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    # No one client address holds more than this many of them.
    max_connections_per_client: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 256
    keepalive_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 75.0
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    # The `kvroute` response section names the replica and the predicted hit: for
    # untrusted clients, a way to probe others' unsalted prompts. cache_salt isolates.
    expose_routing: bool = True
    # The routers' CURVE key pair (a `kvroute keygen` secret file), for external
    # engines that admit only known subscribers; None: a fresh pair per launch.
    curve_key_file: str | None = None
    # /health and /health/ready answer 503 below this many serving replicas.
    min_ready_replicas: AtLeastOne = 1

    def __post_init__(self) -> None:
        check_policy(self.policy, self.policy_options)
        for key, path in (
            ("api_keys_file", self.api_keys_file),
            ("curve_key_file", self.curve_key_file),
        ):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"router.{key}: no such file {path}")

    def api_keys(self) -> frozenset[str]:
        """The accepted keys, read now (the environment of the process that asks)."""
        keys: set[str] = set()
        if self.api_keys_file is not None:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys.update(line.strip() for line in lines if line.strip() and line[0] != "#")
        if self.api_keys_env is not None:
            value = os.environ.get(self.api_keys_env, "")
            keys.update(key.strip() for key in value.split(",") if key.strip())
        if (self.api_keys_file or self.api_keys_env) and not keys:
            raise ValueError("router.api_keys_file / api_keys_env name no key")
        return frozenset(keys)


class ExternalEventsConfig(Struct):
    """An external engine's KV event stream, as vLLM's `--kv-events-config` sets it
    up: a ZMQ PUB endpoint, an optional replay endpoint, and a topic."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    # The engine's CURVE public key (Z85, one line). vLLM has no CURVE: without a
    # key the stream is in clear, which only a loopback endpoint or an explicit
    # allow_insecure accepts.
    curve_public_key_file: str | None = None
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"endpoint {self.endpoint!r} must be tcp://HOST:PORT or ipc://PATH")
        key_file = self.curve_public_key_file
        if key_file is not None:
            if not Path(key_file).is_file():
                raise ValueError(f"curve_public_key_file: no such file {key_file}")
            return
        host = self.endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        exposed = self.endpoint.startswith("tcp://") and host not in LOOPBACK_HOSTS
        if exposed and not self.allow_insecure:
            raise ValueError(
                f"events from {self.endpoint} would carry prompts in clear over the "
                "network; give curve_public_key_file, or set allow_insecure: true"
            )

    def curve_public_key(self) -> str | None:
        """The engine's public key, read now (CurveKeyFileError names a bad file)."""
        if self.curve_public_key_file is None:
            return None
        keys = read_public_keys(self.curve_public_key_file)
        if len(keys) != 1:
            raise ValueError(f"{self.curve_public_key_file}: expected one public key")
        return next(iter(keys))


class ExternalEngineConfig(Struct):
    """An engine kvroute did not start (vLLM, or `kvroute serve-replica`), reached
    over its OpenAI-compatible HTTP API, and indexed from its KV event stream.

    `layout` is the engine's KV cache groups (kinds, block sizes, windows) in the
    `model:` section's shape; omitted, it is the cluster's `model:` section.
    `hash_mode: tokens` keys its blocks by the router's own hash of the token ids
    its events carry, so its hash seed need not be known; `seeded` trusts its
    block hashes and needs `hash_seed` (the engine's PYTHONHASHSEED) to equal
    the router's `hashing.seed`, which registration checks. `kind` names its engine
    kind in `router/engines/registry.py` (its request dialect, event format and hit
    rule): `vllm` for vLLM and `kvroute serve-replica`. `hash_dialect` is how the
    engine puts cache salts and LoRA names into its hashes (vLLM 0.32 and later tag
    them: "tagged"); seeded mode re-keys a "tagged" engine's blocks, and refuses an
    engine whose first salted or LoRA block contradicts the setting."""

    name: str
    url: str
    events: ExternalEventsConfig
    kind: str = "vllm"
    hash_mode: Literal["tokens", "seeded"] = "tokens"
    hash_seed: str | None = None
    hash_dialect: HashDialect = "untagged"
    layout: ModelConfig | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        if self.hash_mode == "seeded" and self.hash_seed is None:
            raise ValueError(f"engine {self.name!r}: hash_mode seeded needs hash_seed")


class ClusterConfig(Struct):
    address: str | None = None  # None: an embedded local Ray; else ray.init(address=...)
    namespace: str = "kvroute"
    num_cpus: int | None = None  # for the embedded Ray only


class WorkloadConfig(Struct):
    """The bundled workload `kvroute run` replays: tenants with shared system prompts."""

    requests: int = 200
    tenants: int = 8
    system_prompt_tokens: int = 1024
    question_tokens: int = 128
    max_tokens: int = 32
    concurrency: int = 16
    seed: int = 0


class DeploymentSections(Struct):
    """The sections that describe replicas and the router, shared by the
    cluster config and the benchmark config."""

    model: ModelConfig = ModelConfig()
    hashing: HashingConfig = HashingConfig()
    replicas: ReplicasConfig = ReplicasConfig()
    events: EventsConfig = EventsConfig()
    router: RouterConfig = RouterConfig()

    def replica_settings(self, namespace: str = "kvroute") -> ReplicaSettings:
        return ReplicaSettings(
            model=self.model,
            hashing=self.hashing,
            replicas=self.replicas,
            events=self.events,
            namespace=namespace,
        )


# The router's hash when it owns it (see `Config.router_hash_algo`).
OWN_HASH_ALGO = "xxh64_tokens"


class Config(DeploymentSections):
    cluster: ClusterConfig = ClusterConfig()
    workload: WorkloadConfig = WorkloadConfig()
    external: list[ExternalEngineConfig] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.replicas.count == 0 and not self.external:
            raise ValueError("replicas.count is 0 and no external engine is configured")
        names = [engine.name for engine in self.external]
        own = {f"replica-{i}" for i in range(self.replicas.count)}
        clash = sorted({n for n in names if names.count(n) > 1 or n in own})
        if clash:
            raise ValueError(f"external engine names must be unique and not replica-N: {clash}")

    @property
    def engine_count(self) -> int:
        """Every engine the router fronts: its own replicas and external ones."""
        return self.replicas.count + len(self.external)

    @property
    def router_hash_algo(self) -> str:
        """The function the router hashes prompts with. With no replica of its own and
        every external engine in `tokens` mode, the router re-keys every block from
        token ids, so its hash is its own business: the compiled `xxh64_tokens`
        (tens of nanoseconds a block, against microseconds for a pickle and a
        sha256). Otherwise `hashing.algo`, which seeded engines must share."""
        owns_hash = self.replicas.count == 0 and all(
            engine.hash_mode == "tokens" for engine in self.external
        )
        return OWN_HASH_ALGO if owns_hash else self.hashing.algo

    def replica_settings(self, namespace: str | None = None) -> ReplicaSettings:
        return super().replica_settings(namespace or self.cluster.namespace)


T = TypeVar("T", bound=DeploymentSections)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and key."""


def parse_config(
    data: dict[str, Any],
    source: str = "<config>",
    kind: type[T] = Config,  # type: ignore[assignment]
) -> T:
    try:
        config = msgspec.convert(data, kind)
        # The model as every replica will build it (checked, pool sized).
        config = msgspec.structs.replace(config, model=resolve_model(config.model, config.replicas))
        config.model.kv_cache_config()
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(
    path: str | Path,
    kind: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Read a YAML config of `kind` (the cluster config by default)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(data, str(path), kind)
