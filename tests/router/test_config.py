"""Every shipped config parses; bad configs fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.router.config import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "name",
    [
        "default.yaml",
        "full-attention.yaml",
        "multi-node.yaml",
        "multi-router.yaml",
        "external.yaml",
    ],
)
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
        ({"router": {"header_timeout_s": 0}}, r"Expected `float` > 0.0 - at `\$.router.header"),
        ({"router": {"max_connections": 0}}, r"Expected `int` >= 1 - at `\$.router.max_conn"),
        (
            {"router": {"data_plane": "grpc"}},
            r"Invalid enum value 'grpc' - at `\$.router.data_plane`",
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


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"policy": "best"}, r"unknown routing policy 'best'; expected one of: kv_aware"),
        (
            {"policy": "kv_aware", "policy_options": {"weights": {"queue_weigth": 1}}},
            r"policy 'kv_aware' options: Object contains unknown field `queue_weigth`",
        ),
        (
            {"policy": "kv_aware", "policy_options": {"temperature": -1}},
            r"policy 'kv_aware' options: Expected `float` >= 0.0 - at `\$.temperature`",
        ),
        (
            {"policy": "sglang_like", "policy_options": {"match_threshold": 2}},
            r"Expected `float` <= 1.0 - at `\$.match_threshold`",
        ),
        (
            {"policy": "round_robin", "policy_options": {"seed": 1}},
            r"policy 'round_robin' options: Object contains unknown field `seed`",
        ),
    ],
)
def test_policy_options_are_checked_when_the_config_loads(router: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"router": router}, "x.yaml")


def test_bench_config_policy_options_load_typed() -> None:
    from kvroute.benchmarks.sim.config import load_bench_config
    from kvroute.router.policy import KVAware, make_policy

    config = load_bench_config(CONFIGS / "bench.yaml")
    policy = make_policy(config.router.policy, **config.router.policy_options)
    assert isinstance(policy, KVAware)
    assert policy.weights.queue_weight == 0.15
    assert policy.weights.prefill_s_per_token == 1e-4


def test_an_unencrypted_event_plane_off_loopback_must_be_asked_for() -> None:
    exposed = {"events": {"host": "0.0.0.0", "security": "none"}}
    with pytest.raises(ConfigError, match=r"events\.security: none on host 0\.0\.0\.0 would"):
        parse_config(exposed, "x.yaml")
    allowed = parse_config({"events": {**exposed["events"], "allow_insecure": True}}, "x.yaml")
    assert allowed.events.security == "none"
    assert parse_config({}, "x.yaml").events.security == "curve"
    assert parse_config({"events": {"security": "none"}}, "x.yaml").events.host == "127.0.0.1"


def _engine(**overrides: object) -> dict:
    engine = {
        "name": "vllm-0",
        "url": "http://127.0.0.1:8100",
        "events": {"endpoint": "tcp://127.0.0.1:5557"},
    }
    engine.update(overrides)
    return engine


def test_a_cluster_of_external_engines_only_parses() -> None:
    config = parse_config({"replicas": {"count": 0}, "external": [_engine()]})
    (engine,) = config.external
    assert (engine.hash_mode, engine.events.topic, config.engine_count) == ("tokens", "", 1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replicas": {"count": 0}}, "replicas.count is 0 and no external engine"),
        (
            {"external": [_engine(events={"endpoint": "tcp://10.0.0.5:5557"})]},
            r"in clear over the network; give curve_public_key_file, or set allow_insecure",
        ),
        ({"external": [_engine(url="ftp://x")]}, "must start with http:// or https://"),
        ({"external": [_engine(hash_mode="seeded")]}, "hash_mode seeded needs hash_seed"),
        ({"external": [_engine(), _engine()]}, r"must be unique and not replica-N: \['vllm-0'\]"),
        ({"external": [_engine(name="replica-0")]}, r"not replica-N: \['replica-0'\]"),
        (
            {
                "external": [
                    _engine(
                        events={"endpoint": "tcp://127.0.0.1:1", "curve_public_key_file": "/nope"}
                    )
                ]
            },
            "curve_public_key_file: no such file /nope",
        ),
    ],
)
def test_bad_external_engines_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "bad.yaml")


def test_the_routers_curve_key_pair_can_come_from_a_keygen_file(tmp_path: Path) -> None:
    from kvroute.events.curve import write_key_pair
    from kvroute.router.app.launch import cluster_keys

    written = write_key_pair(tmp_path / "router.key")
    config = parse_config({"router": {"curve_key_file": str(tmp_path / "router.key")}})
    assert cluster_keys(config) == written
    fresh = cluster_keys(parse_config({}))
    assert fresh is not None and fresh != written
    with pytest.raises(ConfigError, match=r"router\.curve_key_file: no such file /nope"):
        parse_config({"router": {"curve_key_file": "/nope"}})


def test_an_external_engines_public_key_is_read_from_its_file(tmp_path: Path) -> None:
    from kvroute.events.curve import write_key_pair

    engine_keys = write_key_pair(tmp_path / "engine.key")
    events = {
        "endpoint": "tcp://10.0.0.5:5557",
        "curve_public_key_file": f"{tmp_path}/engine.key.pub",
    }
    config = parse_config({"external": [_engine(events=events)]})
    assert config.external[0].events.curve_public_key() == engine_keys.public_key


@pytest.mark.parametrize(
    ("data", "algo"),
    [
        # Every block is re-keyed from token ids: the router's hash is its own.
        ({"replicas": {"count": 0}, "external": [_engine()]}, "xxh64_tokens"),
        # Its own replicas hash as configured, and so must the router.
        ({"replicas": {"count": 1}, "external": [_engine()]}, "sha256"),
        # A seeded engine's hashes are trusted as they come: the router must share them.
        (
            {
                "replicas": {"count": 0},
                "external": [_engine(), _engine(name="b", hash_mode="seeded", hash_seed="7")],
            },
            "sha256",
        ),
    ],
)
def test_the_router_owns_its_hash_only_when_no_engine_needs_the_configured_one(
    data: dict, algo: str
) -> None:
    config = parse_config({**data, "hashing": {"algo": "sha256"}})
    assert config.router_hash_algo == algo
