"""The CLI's light commands: no heavy imports, one clear line when no router answers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from kvroute.configs import CONFIG_DIR, bundled_config_names, resolve_config
from kvroute.router.app.cli import build_parser, main

HEAVY = ("torch", "numba", "ray")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`kvroute ARGS` in a fresh interpreter; stderr ends with the heavy modules it loaded."""
    probe = (
        "import sys\n"
        "from kvroute.router.app.cli import main\n"
        "code = main(sys.argv[1:])\n"
        f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", [["submit", "hi"], ["status"], ["submit", "a", "b"]])
def test_light_command_to_an_absent_router_prints_one_line_naming_the_url(
    command: list[str],
) -> None:
    done = run_cli(*command, "--url", "http://127.0.0.1:9")
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "heavy"))]
    assert done.returncode == 1
    assert lines[0].startswith("error: no kvroute router answers at http://127.0.0.1:9 (")
    assert lines[1] == "heavy:"
    assert "Traceback" not in done.stderr


def test_help_loads_no_heavy_module() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom router.cli import build_parser\nbuild_parser().format_help()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == ""


def test_bundled_configs_resolve_by_name_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config("default") == CONFIG_DIR / "default.yaml"
    assert resolve_config("default.yaml") == CONFIG_DIR / "default.yaml"
    assert {"default", "full-attention", "bench"} <= set(bundled_config_names())


def test_a_file_in_the_current_directory_wins_over_a_bundled_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default.yaml").write_text("replicas: {count: 1}\n")
    assert resolve_config("default.yaml") == Path("default.yaml")


def test_unknown_config_is_one_error_line_listing_the_bundled_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["up", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no config file at 'no-such-config', and no bundled config")
    assert "default" in err
    assert err.count("\n") == 1


def test_config_command_prints_a_bundled_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "default"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "default.yaml").read_text()


def test_run_and_up_default_to_the_bundled_default_config() -> None:
    parser = build_parser()
    assert parser.parse_args(["run"]).config == "default"
    up = parser.parse_args(["up", "--config", "mine.yaml", "--log-level", "info"])
    assert (up.config_option, up.log_level) == ("mine.yaml", "INFO")


def test_bench_writes_to_the_current_directory_by_default() -> None:
    assert build_parser().parse_args(["bench"]).out == "kvroute-bench"


def test_submit_of_several_prompts_keeps_lora_name_and_cache_salt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI's batch path against a real HTTP listener that records the bodies it gets."""
    bodies: list[dict[str, object]] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        return web.json_response(
            {
                "id": f"cmpl-{len(bodies)}",
                "choices": [{"text": "ok"}],
                "usage": {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}},
                "kvroute": {"replica_id": "r0", "ttft_s": 0.001},
            }
        )

    with serve_in_thread(completions) as url:
        code = main(
            ["submit", "one", "two", "--lora-name", "bot", "--cache-salt", "t1", "--url", url]
        )
    assert code == 0
    assert sorted((b["prompt"], b["lora_name"], b["cache_salt"]) for b in bodies) == [
        ("one", "bot", "t1"),
        ("two", "bot", "t1"),
    ]
    assert capsys.readouterr().out.count("replica=r0") == 2


@contextlib.contextmanager
def serve_in_thread(handler: Callable[[web.Request], Awaitable[web.Response]]) -> Iterator[str]:
    """An aiohttp server on a free loopback port, run on its own thread and loop."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("replicas: {count: -1}", "Expected `int` >= 0 - at `$.replicas.count`"),
        ("router: {max_retries: -1}", "Expected `int` >= 0 - at `$.router.max_retries`"),
        ("router: {http_port: 70000}", "Expected `int` <= 65535 - at `$.router.http_port`"),
        ("router: {load_poll_s: 0}", "Expected `float` > 0.0 - at `$.router.load_poll_s`"),
        ("router: {policy: best}", "unknown routing policy 'best'"),
        ("router: {api_keys_file: /no/such/keys}", "router.api_keys_file: no such file"),
        ("replicas: {cost: {step_base_s: -1}}", "at `$.replicas.cost.step_base_s`"),
    ],
)
def test_a_bad_config_fails_before_ray_starts_naming_its_key(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text + "\n")
    done = run_cli("run", str(config))
    assert done.returncode == 2
    assert f"error: {config}: " in done.stderr and message in done.stderr
    assert "ray" not in done.stderr.splitlines()[-1].removeprefix("heavy:").split(",")


def test_config_lists_runnable_configs_apart_from_bench_and_ray_launcher_files(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out.splitlines()
    bench_at = out.index("benchmark parameters (kvroute bench --config NAME):")
    launcher_at = out.index("Ray cluster launcher files (for `ray up`, not kvroute configs):")
    assert out[0] == "cluster configs (kvroute run / up NAME):"
    runnable = [line.strip() for line in out[1:bench_at]]
    assert "default" in runnable and "external" in runnable
    assert "bench" not in runnable and "ray-cluster" not in runnable
    assert [line.strip() for line in out[bench_at + 1 : launcher_at]] == ["bench"]
    assert out[launcher_at + 1 :] == [f"  {CONFIG_DIR / 'ray-cluster'}.yaml"]


def test_bench_without_matplotlib_says_so_before_simulating(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--limit", "1"])
    assert str(stopped.value) == (
        "error: kvroute bench draws its plots with matplotlib: pip install 'kvroute[bench]' first"
    )
