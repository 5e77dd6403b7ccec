"""`pip install kvroute` adds one top-level name to site-packages, with its data inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path_factory.mktemp("source") / "kvroute"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("kvroute-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_names_kvroute_as_its_only_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["kvroute"]
    roots = {name.split("/")[0] for name in names}
    assert {root for root in roots if not root.endswith(".dist-info")} == {"kvroute"}


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_traces_but_not_tests_or_results(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "kvroute/configs/default.yaml" in names
    assert "kvroute/benchmarks/data/traces/conversation_trace.jsonl.gz" in names
    assert "kvroute/router/core.py" in names
    assert "kvroute/replicas/http_server/serve.py" in names
    assert not [n for n in names if n.startswith(("tests/", "kvroute/tests/"))]
    assert not [n for n in names if "/results/" in n]


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_finds_its_bundled_configs(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    before = {p.name for p in site.iterdir()}
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    added = {p.name for p in site.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"kvroute"}
    listed = subprocess.run(
        [
            str(python),
            "-c",
            "from kvroute.configs import bundled_config_names; print(bundled_config_names())",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    ).stdout.strip()
    assert "'default'" in listed
