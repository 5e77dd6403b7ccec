"""Block-hash functions shared by replicas and router.

Each function maps a Python object (a block's `(parent, tokens, extra_keys)`
tuple) to bytes. The sha256 pair matches vLLM byte for byte; the xxh3 pair is
the fast non-cryptographic option (about 3x cheaper per block here). Replicas
and the router must agree on the function and the seed, so both are named by
string in configs and registration.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import cbor2
import xxhash

HashFn = Callable[[Any], bytes]


def sha256(value: Any) -> bytes:
    """SHA-256 of the pickle (protocol 5) of `value`; vLLM's default."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def sha256_cbor(value: Any) -> bytes:
    """SHA-256 of canonical CBOR: stable across Python versions and languages."""
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


def xxhash128(value: Any) -> bytes:
    """xxh3-128 of the pickle of `value`: fast, not collision resistant."""
    return xxhash.xxh3_128_digest(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def xxhash128_cbor(value: Any) -> bytes:
    """xxh3-128 of canonical CBOR."""
    return xxhash.xxh3_128_digest(cbor2.dumps(value, canonical=True))


HASH_FUNCTIONS: dict[str, HashFn] = {
    "sha256": sha256,
    "sha256_cbor": sha256_cbor,
    "xxhash": xxhash128,
    "xxhash_cbor": xxhash128_cbor,
}


def get_hash_fn_by_name(name: str) -> HashFn:
    """Look a hash function up by its config name, with a clear error."""
    try:
        return HASH_FUNCTIONS[name]
    except KeyError:
        known = ", ".join(sorted(HASH_FUNCTIONS))
        raise ValueError(f"unknown hash function {name!r}; expected one of: {known}") from None


def hash_fn_name(fn: HashFn) -> str:
    """The config name of a hash function (inverse of `get_hash_fn_by_name`)."""
    for name, candidate in HASH_FUNCTIONS.items():
        if candidate is fn:
            return name
    raise ValueError(f"{fn!r} is not a registered block-hash function")


def event_hash_from_bytes(block_hash: bytes) -> int:
    """The hash as sent in events: the last 8 bytes as an unsigned 64-bit int."""
    return int.from_bytes(block_hash[-8:], "big")
