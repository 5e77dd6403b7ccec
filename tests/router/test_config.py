"""Every shipped config parses; bad configs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["default.yaml", "full-attention.yaml", "multi-node.yaml"])
def test_shipped_cluster_configs_parse(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.model.kv_cache_config().num_blocks == config.model.num_blocks


def test_default_config_is_a_local_hybrid_cluster_of_four() -> None:
    config = load_config(CONFIGS / "default.yaml")
    kinds = [g.kind for g in config.model.groups]
    assert (config.cluster.address, config.replicas.count, kinds) == (
        None,
        4,
        ["full_attention", "sliding_window"],
    )
    assert config.events.host == config.router.http_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"blok_size": 3}}, r"unknown field `blok_size` - at `\$.model`"),
        ({"replicas": {"count": "four"}}, r"Expected `int`, got `str` - at `\$.replicas.count`"),
        ({"model": {"groups": [{"kind": "sparse"}]}}, r"at `\$.model.groups\[0\].kind`"),
        ({"model": {"groups": [{"kind": "sliding_window"}]}}, "needs `sliding_window`"),
        (
            {"model": {"groups": [{"kind": "full_attention", "dtype": "fp7"}]}},
            "unknown dtype 'fp7'",
        ),
        ({"hashing": {"algo": "md5"}}, r"at `\$.hashing.algo`"),
        (
            {"replicas": {"probation_fraction": 1.0}},
            r"Expected `float` < 1.0 - at `\$.replicas.probation_fraction`",
        ),
    ],
)
def test_bad_configs_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "bad.yaml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed)
