"""Block-hash functions shared by replicas and router.

Each function maps a Python object (a block's `(parent, tokens, extra_keys)`
tuple) to bytes. The sha256 pair matches vLLM byte for byte; the xxh3 pair is
the fast non-cryptographic option (about 3x cheaper per block here). Replicas
and the router must agree on the function and the seed, so both are named by
string in configs and registration.

`xxh64_tokens` is for a router that owns its hash (engines registered in
`tokens` mode, re-keyed from their token ids) and for kvroute's own replicas:
vLLM has no such function. It hashes a block's raw token ids instead of a
pickle, and a whole prompt's chain in one compiled call (`chain`), so a block
costs tens of nanoseconds instead of a Python call to pickle and a digest.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import numpy as np
import xxhash
from numba import njit

from kvroute.events.kv_events import TokenIds

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


# XXH64 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md) over whole
# little-endian words, compiled so a prompt's whole chain is one call;
# `TokenChainHash.__call__` computes the same digests with the xxhash package's C,
# which the tests hold the kernel to.
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
# The two lanes of a 16-byte digest: XXH64 of the same bytes with these seeds.
LANE_SEEDS = (0, 0x9E3779B97F4A7C15)
DIGEST_BYTES = 16


@njit(cache=True, inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(cache=True, inline="always")
def _round(acc: np.uint64, lane: np.uint64) -> np.uint64:
    return _rotl(acc + lane * _P2, 31) * _P1


@njit(cache=True, inline="always")
def _merge(acc: np.uint64, lane: np.uint64) -> np.uint64:
    return (acc ^ _round(np.uint64(0), lane)) * _P1 + _P4


@njit(cache=True, inline="always")
def _avalanche(h: np.uint64) -> np.uint64:
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    return h ^ (h >> np.uint64(32))


@njit(cache=True, inline="always")
def _xxh64_pair(
    words: np.ndarray, seed_a: np.uint64, seed_b: np.uint64
) -> tuple[np.uint64, np.uint64]:
    """XXH64 of the little-endian bytes of `words` (a whole number of 8-byte words)
    with two seeds at once: the lanes are independent, so interleaving them lets
    the CPU run both multiply chains side by side."""
    n = words.size
    i = 0
    if n >= 4:
        a1, a2, a3, a4 = seed_a + _P1 + _P2, seed_a + _P2, seed_a, seed_a - _P1
        b1, b2, b3, b4 = seed_b + _P1 + _P2, seed_b + _P2, seed_b, seed_b - _P1
        while i + 4 <= n:
            w1, w2, w3, w4 = words[i], words[i + 1], words[i + 2], words[i + 3]
            a1, b1 = _round(a1, w1), _round(b1, w1)
            a2, b2 = _round(a2, w2), _round(b2, w2)
            a3, b3 = _round(a3, w3), _round(b3, w3)
            a4, b4 = _round(a4, w4), _round(b4, w4)
            i += 4
        ha = _rotl(a1, 1) + _rotl(a2, 7) + _rotl(a3, 12) + _rotl(a4, 18)
        hb = _rotl(b1, 1) + _rotl(b2, 7) + _rotl(b3, 12) + _rotl(b4, 18)
        ha = _merge(_merge(_merge(_merge(ha, a1), a2), a3), a4)
        hb = _merge(_merge(_merge(_merge(hb, b1), b2), b3), b4)
    else:
        ha, hb = seed_a + _P5, seed_b + _P5
    length = np.uint64(8 * n)
    ha += length
    hb += length
    while i < n:
        k = _round(np.uint64(0), words[i])
        ha = _rotl(ha ^ k, 27) * _P1 + _P4
        hb = _rotl(hb ^ k, 27) * _P1 + _P4
        i += 1
    return _avalanche(ha), _avalanche(hb)


@njit(cache=True)
def _chain(
    root: np.ndarray, tokens: np.ndarray, block_words: int, seeds: np.ndarray, out: np.ndarray
) -> None:
    """Row b of `out` becomes the digest of block b: XXH64 of the previous digest
    (`root` for block 0) followed by the block's token words, one lane per seed.
    Words are little-endian (the caller checks), so a digest's bytes are its
    lanes little-endian."""
    buf = np.empty(2 + block_words, np.uint64)
    buf[:2] = root
    seed_a, seed_b = seeds[0], seeds[1]
    for b in range(out.shape[0]):
        buf[2:] = tokens[b * block_words : (b + 1) * block_words]
        lane_a, lane_b = _xxh64_pair(buf, seed_a, seed_b)
        out[b, 0] = buf[0] = lane_a
        out[b, 1] = buf[1] = lane_b


_UNPACK_CHUNK = 256


@functools.cache
def _digests(count: int) -> struct.Struct:
    """Splits `count` concatenated digests into bytes objects in one C call."""
    return struct.Struct(f"{DIGEST_BYTES}s" * count)


def _split_digests(raw: bytes) -> list[bytes]:
    count = len(raw) // DIGEST_BYTES
    full = _digests(_UNPACK_CHUNK)
    step = _UNPACK_CHUNK * DIGEST_BYTES
    out: list[bytes] = []
    for offset in range(0, count // _UNPACK_CHUNK * step, step):
        out.extend(full.unpack_from(raw, offset))
    rest = count % _UNPACK_CHUNK
    if rest:
        out.extend(_digests(rest).unpack_from(raw, len(raw) - rest * DIGEST_BYTES))
    return out


def _token_words(
    token_ids: Sequence[int] | np.ndarray, start: int, count: int
) -> np.ndarray | None:
    """Tokens start..start+count as little-endian uint32, viewed as uint64 words
    when they fill whole words; None if one does not fit. A uint32 array (or a
    decoded event's `TokenIds`) is read as it is; Python ints are packed by
    `array("I")`, the cheapest conversion of them (about 7 ns each here)."""
    if isinstance(token_ids, TokenIds):
        token_ids = token_ids.array
    if isinstance(token_ids, np.ndarray) and token_ids.dtype == np.uint32:
        packed = token_ids[start : start + count]
        if not packed.flags.c_contiguous or packed.ctypes.data % 8:
            packed = packed.copy()  # a fresh array is contiguous and word-aligned
    else:
        whole = start == 0 and count == len(token_ids)
        try:
            ints = array("I", token_ids if whole else token_ids[start : start + count])
        except OverflowError:
            return None
        if ints.itemsize != 4:
            return None
        packed = np.frombuffer(ints, np.uint32)
    if sys.byteorder == "big":
        packed = packed.byteswap()
    return packed.view(np.uint64) if packed.size % 2 == 0 else packed


class TokenChainHash:
    """Block hash over raw token ids, with a compiled chain for whole prompts.

    A plain block `(parent, tokens, None)` whose parent is a 16-byte digest and
    whose token ids fit in uint32 hashes to XXH64(parent + tokens as LE uint32)
    with seed `LANE_SEEDS[0]`, then with `LANE_SEEDS[1]`, each 8 bytes little-endian
    (the event key, the last 8 bytes read big-endian, is the second lane's bytes
    reversed). Anything else (a
    seed string, a block with extra keys, a token past uint32) is xxh3-128 of its
    canonical CBOR. `chain` and `__call__` give the same bytes for every block.
    """

    __name__ = "xxh64_tokens"
    _seeds = np.array(LANE_SEEDS, np.uint64)

    def __call__(self, value: Any) -> bytes:
        if (
            type(value) is tuple
            and len(value) == 3
            and value[2] is None
            and type(value[0]) is bytes
            and len(value[0]) == DIGEST_BYTES
        ):
            tokens = _token_words(value[1], 0, len(value[1]))
            if tokens is not None:
                data = value[0] + tokens.tobytes()
                return b"".join(
                    xxhash.xxh64_intdigest(data, seed=seed).to_bytes(8, "little")
                    for seed in LANE_SEEDS
                )
        return xxhash.xxh3_128_digest(cbor2.dumps(value, canonical=True))

    def chain(
        self, parent: bytes, token_ids: Sequence[int] | np.ndarray, start: int, block_size: int
    ) -> list[bytes] | None:
        """Digests of the plain blocks of `token_ids` from `start`, each chained on the
        one before (`parent` for the first), as `__call__` would make them one by one;
        None when the compiled form does not apply (then hash block by block): an odd
        block size (the kernel reads whole 8-byte words), a big-endian machine, a
        token past uint32."""
        count = (len(token_ids) - start) // block_size
        if count <= 0 or len(parent) != DIGEST_BYTES or block_size % 2 or sys.byteorder == "big":
            return None
        tokens = _token_words(token_ids, start, count * block_size)
        if tokens is None:
            return None
        out = np.empty((count, 2), np.uint64)
        root = np.frombuffer(parent, np.uint64)
        _chain(root, tokens, block_size // 2, self._seeds, out)
        return _split_digests(out.tobytes())


xxh64_tokens = TokenChainHash()

HASH_FUNCTIONS: dict[str, HashFn] = {
    "sha256": sha256,
    "sha256_cbor": sha256_cbor,
    "xxhash": xxhash128,
    "xxhash_cbor": xxhash128_cbor,
    "xxh64_tokens": xxh64_tokens,
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
