"""`kvroute`: launch a cluster, submit prompts, inspect it, replay a workload.

kvroute run [CONFIG]          launch, replay the bundled workload, report, stop
kvroute up [--config CONFIG]  launch and serve until Ctrl-C
kvroute submit PROMPT ...     send prompts to a running router
kvroute status                replicas, index size, hit rate
kvroute config [NAME]         print a bundled config (copy it out to edit it)
kvroute serve-replica [CONFIG] one replica as a standalone vLLM-like server (no Ray)
kvroute keygen PATH           a CURVE key pair for the event plane: PATH, PATH.pub
kvroute bench                 simulate the policies on a trace (a plugin of the benchmarks)

CONFIG is a YAML path or a bundled config's name (default: `default`). Heavy modules
(ray, torch, numba, the benchmarks) are imported only by the commands that use them,
so `--help`, `submit` and `status` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from kvroute.configs import CONFIG_DIR, bundled_config_names, config_kind, resolve_config
from kvroute.router.app.client import KVRouteClient, KVRouteError, RouterUnreachableError
from kvroute.router.app.logs import DEFAULT_LOG_LEVEL, LOG_LEVELS, configure_logging

if TYPE_CHECKING:
    from kvroute.router.app.report import RunSummary
    from kvroute.router.config import Config

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_CONFIG = "default"


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _load(name_or_path: str) -> Config:
    from kvroute.router.config import ConfigError, load_config

    try:
        config = load_config(resolve_config(name_or_path))
    except (FileNotFoundError, ConfigError) as exc:
        raise CommandError(str(exc)) from None
    from kvroute.router.engines.registry import external_kind

    for i, engine in enumerate(config.external):
        try:
            external_kind(engine.kind)
        except ValueError as exc:
            raise CommandError(f"external[{i}].kind: {exc}") from None
    return config


def _with_port(config: Config, port: int | None) -> Config:
    import msgspec

    if port is None:
        return config
    return msgspec.structs.replace(
        config, router=msgspec.structs.replace(config.router, http_port=port)
    )


def _replay(cluster: Any, config: Config, policy: str) -> RunSummary:
    """Replay the workload under `policy` on cold caches; summarize it."""
    from kvroute.router.app.report import summarize
    from kvroute.router.app.workload import shared_prefix_workload

    cluster.router.call("set_policy", policy)
    cluster.router.call("wait_for_replicas", config.engine_count)
    if not cluster.router.call("reset_prefix_caches"):
        raise RuntimeError("a replica was busy or gone and could not reset its prefix cache")
    time.sleep(0.5)  # let the AllBlocksCleared events reach the index
    workload = shared_prefix_workload(config.workload, config.model.vocab_size)
    client = KVRouteClient(cluster.url)
    print(f"replaying {len(workload)} requests with policy {policy}", file=sys.stderr)
    started = time.perf_counter()
    responses = client.generate_batch(
        [w.prompt_token_ids for w in workload],
        config.workload.max_tokens,
        concurrency=config.workload.concurrency,
    )
    wall = time.perf_counter() - started
    replicas = cluster.router.call("replica_ids")
    return summarize(policy, responses, replicas, wall)


def cmd_run(args: argparse.Namespace) -> int:
    config = _with_port(_load(args.config), 0)  # a bad config fails before Ray starts

    from kvroute.router.app.launch import start_cluster
    from kvroute.router.app.report import format_report

    print(f"launching {config.engine_count} replicas from {args.config} ...", file=sys.stderr)
    cluster = start_cluster(config, log_level=args.log_level)
    try:
        w = config.workload
        summaries = [_replay(cluster, config, policy) for policy in ("kv_aware", "round_robin")]
        status = cluster.router.call("status")
    finally:
        cluster.stop()
    print(
        f"\nkvroute run {args.config}: {config.engine_count} replicas of {config.model.name} "
        f"({len(config.model.groups)} KV cache groups); workload: {w.requests} requests, "
        f"{w.tenants} tenants x {w.system_prompt_tokens}-token system prompt + "
        f"{w.question_tokens}-token question, {w.max_tokens} output tokens, "
        f"{w.concurrency} in flight\n"
    )
    print(format_report(summaries))
    print("\nevent streams after the run:")
    for replica in status["replicas"]:
        print(
            f"  {replica['replica_id']}: state {replica['state']}, {replica['batches']} batches, "
            f"{replica['gaps']} gaps, {replica['resyncs']} resyncs, "
            f"{replica['malformed']} malformed"
        )
    kv, rr = summaries
    print(
        f"\nkv_aware hit rate {kv.hit_rate:.1%} vs round_robin {rr.hit_rate:.1%}; "
        f"TTFT p50 {kv.ttft_p50 * 1e3:.1f} ms vs {rr.ttft_p50 * 1e3:.1f} ms"
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    config = _with_port(_load(args.config_option or args.config), args.port)

    from kvroute.router.app.launch import start_cluster

    cluster = start_cluster(config, log_level=args.log_level)
    urls = ", ".join(cluster.urls)
    print(f"kvroute is serving {config.engine_count} engines at {urls} (Ctrl-C stops)")
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    client = KVRouteClient(args.url)
    prompts: list[Any] = list(args.prompt)
    if args.file:
        with open(args.file) as handle:
            prompts.extend(line.rstrip("\n") for line in handle if line.strip())
    if args.token_ids:
        prompts = [json.loads(p) for p in prompts]
    if not prompts:
        print("nothing to submit: give prompts or --file", file=sys.stderr)
        return 2
    options = {"lora_name": args.lora_name, "cache_salt": args.cache_salt}
    if len(prompts) == 1:
        results = [client.generate(prompts[0], args.max_tokens, **options)]
    else:
        results = asyncio.run(
            client.agenerate_batch(
                prompts, args.max_tokens, concurrency=args.concurrency, **options
            )
        )
    for result in results:
        meta = result["kvroute"]
        cached = result["usage"]["prompt_tokens_details"]["cached_tokens"]
        prompt_tokens = result["usage"]["prompt_tokens"]
        text = result["choices"][0]["text"]
        print(
            f"{result['id']}  replica={meta['replica_id']}  prompt={prompt_tokens}  "
            f"cached={cached}  ttft={meta['ttft_s'] * 1e3:.1f}ms  text={text!r}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = KVRouteClient(args.url).status()
    print(
        f"policy {status['policy']}, {status['index_entries']} indexed entries, "
        f"{status['predicted_entries']} predicted, dropped {status['index_dropped']}"
    )
    header = (
        f"{'replica':<12} {'state':<10} {'blocks':>7} {'queued':>7} {'running':>7} "
        f"{'kv use':>6} {'requests':>8} {'hit rate':>8}"
    )
    print(header)
    for r in status["replicas"]:
        print(
            f"{r['replica_id']:<12} {r['state']:<10} {r['indexed_blocks']:>7} "
            f"{r['queued_prefill_tokens']:>7} {r['running_seqs']:>7} {r['kv_usage']:>6.1%} "
            f"{r['requests']:>8} {r['hit_rate']:>8.1%}"
        )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print a bundled config, or list them; `kvroute config default > my.yaml` copies one."""
    if args.name is None:
        kinds = {name: config_kind(name) for name in bundled_config_names()}
        print("cluster configs (kvroute run / up NAME):")
        print("".join(f"  {n}\n" for n, kind in kinds.items() if kind == "cluster"), end="")
        print("benchmark parameters (kvroute bench --config NAME):")
        print("".join(f"  {n}\n" for n, kind in kinds.items() if kind == "bench"), end="")
        launchers = [n for n, kind in kinds.items() if kind == "ray-launcher"]
        if launchers:
            print("Ray cluster launcher files (for `ray up`, not kvroute configs):")
            print("".join(f"  {CONFIG_DIR / n}.yaml\n" for n in launchers), end="")
        return 0
    try:
        sys.stdout.write(resolve_config(args.name).read_text())
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    return 0


SERVE_REPLICA_HELP = """\
Run ONE replica engine in this process, without Ray, behind an HTTP server shaped
as vLLM's OpenAI server: POST /v1/completions, /v1/chat/completions, /tokenize;
GET /v1/models, /health, /metrics (vllm:* names). KV events are published over
ZeroMQ in vLLM's wire format, configured by the same JSON as vLLM's
--kv-events-config, e.g.
  '{"enable_kv_cache_events": true, "publisher": "zmq",
    "endpoint": "tcp://127.0.0.1:5557", "replay_endpoint": "tcp://127.0.0.1:5558"}'
Unlike vLLM, the default endpoint is tcp://127.0.0.1:5557, and an endpoint
reachable off this host (*, 0.0.0.0, ...) is refused unless CURVE keys are given
(--curve-secret-key-file) or --allow-insecure-events says events may go in clear.

Block hashes: the chain's root is hash_fn(hashing.seed) when the config sets
hashing.seed; otherwise it is vLLM's: hash_fn(PYTHONHASHSEED) when that variable
is set, else random bytes (hashes private to this process).

SIGTERM or SIGINT aborts what is in flight, closes the event sockets and exits 0.
"""


def cmd_serve_replica(args: argparse.Namespace) -> int:
    from kvroute.events.curve import CurveKeyFileError
    from kvroute.events.kv_events_config import KVEventsConfigError, parse_kv_events_config

    try:
        kv_events = parse_kv_events_config(args.kv_events_config)
    except KVEventsConfigError as exc:
        raise CommandError(str(exc)) from None
    config = _load(args.config)  # a bad config fails before torch builds anything
    path = resolve_config(args.config)

    import zmq

    from kvroute.replicas.http_server.serve import (
        ReplicaProcess,
        ServeOptions,
        pinned_hash_seed,
        replica_settings,
        serve,
    )

    options = ServeOptions(
        host=args.host,
        port=args.port,
        kv_events=kv_events,
        rank=args.rank,
        served_model_name=args.served_model_name,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        allow_insecure_events=args.allow_insecure_events,
        curve_secret_key_file=args.curve_secret_key_file,
        curve_client_keys_file=args.curve_client_keys_file,
    )
    settings = replica_settings(config.replica_settings(), args.executor)
    try:
        process = ReplicaProcess(settings, options, pinned_hash_seed(path))
    except (KVEventsConfigError, CurveKeyFileError) as exc:
        raise CommandError(str(exc)) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            url = await process.start()
        except (OSError, zmq.ZMQError) as exc:
            raise CommandError(f"cannot bind: {exc}") from None
        model = process.served
        print(f"serving {model.name} ({settings.replicas.executor}) at {url}", file=sys.stderr)
        print(process.describe_events(), file=sys.stderr)
        print(f"block hash root: {process.hash_source}", file=sys.stderr)
        await serve(process, stop)

    asyncio.run(main())
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a CURVE key pair: PATH (the secret key, mode 0600) and PATH.pub."""
    from kvroute.events.curve import CurveKeyFileError, write_key_pair

    try:
        keys = write_key_pair(args.path)
    except (CurveKeyFileError, OSError) as exc:
        raise CommandError(str(exc)) from None
    print(f"wrote {args.path} (secret) and {args.path}.pub: {keys.public_key}")
    return 0


def _add_serve_replica(sub: Any) -> None:
    serve = sub.add_parser(
        "serve-replica",
        help="one replica as a standalone vLLM-like server (no Ray)",
        description=SERVE_REPLICA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="path or bundled name")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address (default: loopback)")
    serve.add_argument("--port", type=int, default=8100, help="HTTP port (0: a free one)")
    serve.add_argument(
        "--kv-events-config",
        metavar="JSON",
        help="vLLM's KVEventsConfig as JSON; unknown keys are errors (default: no events)",
    )
    serve.add_argument(
        "--rank", type=int, default=0, help="data-parallel rank: offsets event ports, as vLLM"
    )
    serve.add_argument(
        "--executor",
        choices=("torch", "simulated"),
        help="override replicas.executor from the config",
    )
    serve.add_argument("--served-model-name", help="the model name (default: model.name)")
    serve.add_argument(
        "--enable-prompt-tokens-details",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="usage.prompt_tokens_details.cached_tokens, as vLLM's flag gives it "
        "(default: on here; off in vLLM)",
    )
    serve.add_argument(
        "--allow-insecure-events",
        action="store_true",
        help="allow an event endpoint off this host without CURVE (prompts in clear)",
    )
    serve.add_argument(
        "--curve-secret-key-file",
        metavar="PATH",
        help="this replica's CURVE secret key (from `kvroute keygen`): encrypts events",
    )
    serve.add_argument(
        "--curve-client-keys-file",
        metavar="PATH",
        help="the public keys allowed to subscribe, one Z85 key a line",
    )
    serve.add_argument(
        "--log-level",
        default=DEFAULT_LOG_LEVEL,
        type=str.upper,
        choices=LOG_LEVELS,
        help="what this process logs (default: WARNING)",
    )
    serve.set_defaults(func=cmd_serve_replica)
    keygen = sub.add_parser("keygen", help="write a CURVE key pair: PATH (secret), PATH.pub")
    keygen.add_argument("path")
    keygen.set_defaults(func=cmd_keygen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="launch, replay the bundled workload, print a report")
    run.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="path or bundled name")
    run.set_defaults(func=cmd_run)
    up = sub.add_parser("up", help="launch a cluster and serve until Ctrl-C")
    up.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="path or bundled name")
    up.add_argument("--config", dest="config_option", help="the same as the positional CONFIG")
    up.add_argument("--port", type=int, help="HTTP port (default: router.http_port)")
    up.set_defaults(func=cmd_up)
    for launcher in (run, up):
        launcher.add_argument(
            "--log-level",
            default=DEFAULT_LOG_LEVEL,
            type=str.upper,
            choices=LOG_LEVELS,
            help="what the router and replicas print here (default: WARNING)",
        )
    submit = sub.add_parser("submit", help="send prompts to a running router")
    submit.add_argument("prompt", nargs="*")
    submit.add_argument("--file", help="one prompt per line")
    submit.add_argument("--token-ids", action="store_true", help="prompts are JSON lists of ids")
    submit.add_argument("--max-tokens", type=int, default=16)
    submit.add_argument("--lora-name")
    submit.add_argument("--cache-salt")
    submit.add_argument("--concurrency", type=int, default=16)
    submit.add_argument("--url", default=DEFAULT_URL)
    submit.set_defaults(func=cmd_submit)
    status = sub.add_parser("status", help="replicas, index size, hit rate")
    status.add_argument("--url", default=DEFAULT_URL)
    status.set_defaults(func=cmd_status)
    config = sub.add_parser("config", help="print a bundled config, or list them")
    config.add_argument("name", nargs="?", help="a bundled config's name; none lists them")
    config.set_defaults(func=cmd_config)
    _add_serve_replica(sub)
    for plugin in entry_points(group="kvroute.commands"):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", DEFAULT_LOG_LEVEL))
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RouterUnreachableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KVRouteError as exc:
        print(f"error: the router answered {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
