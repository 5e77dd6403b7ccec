"""The cluster and benchmark configs that ship with kvroute, installed as package data.

`kvroute run`, `up` and `config` take either a path to a YAML file or the name of
one of these (`default`, `full-attention`, ...), so an installed kvroute runs from
any directory.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def bundled_config_names() -> list[str]:
    """Names of the bundled configs, without `.yaml`."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def config_kind(name: str) -> str:
    """What a bundled file configures, from its top-level keys: `cluster` (for `kvroute
    run` and `up`), `bench` (simulation parameters, `kvroute bench --config`) or
    `ray-launcher` (a `ray up` file, not a kvroute config)."""
    keys = {
        line.split(":", 1)[0]
        for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
        if line[:1].isalpha() and ":" in line
    }
    if "cluster_name" in keys:
        return "ray-launcher"
    if "simulation" in keys:
        return "bench"
    return "cluster"


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file at `name_or_path`, else the bundled config of that name.

    Raises FileNotFoundError naming the path tried and the bundled names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{str(name_or_path).removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    raise FileNotFoundError(
        f"no config file at {str(name_or_path)!r}, and no bundled config of that name "
        f"(bundled: {', '.join(bundled_config_names())})"
    )
