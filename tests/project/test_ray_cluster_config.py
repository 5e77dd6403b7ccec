"""configs/ray-cluster.yaml installs kvroute the way a user can: the wheel built from
the checkout, copied to every node, of the version pyproject.toml declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_every_node_installs_the_wheel_the_launcher_copies_to_it() -> None:
    launcher = yaml.safe_load((REPO / "configs" / "ray-cluster.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    (mount,) = launcher["file_mounts"]
    installs = [c for c in launcher["setup_commands"] if "kvroute" in c]
    assert installs == [f"pip install {mount}/kvroute-{version}-py3-none-any.whl"]
    assert launcher["file_mounts"][mount] == "./dist"
