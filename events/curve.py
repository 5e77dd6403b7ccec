"""Optional CurveZMQ encryption and client authentication for the event sockets.

Off by default: our default endpoints are on loopback. A publisher with a
`CurveServerConfig` accepts only clients that complete a CURVE handshake with
its public key, and, when `allowed_clients` is set, only those client keys.
Keys are Z85 text (40 characters), as `zmq.curve_keypair()` makes them. Key
files hold one key a line: a secret key file (mode 0600) for a server, a file
of allowed client public keys for its allowlist.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator


@dataclass(frozen=True)
class CurveKeyPair:
    public_key: str
    secret_key: str

    @classmethod
    def generate(cls) -> CurveKeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


@dataclass(frozen=True)
class CurveServerConfig:
    keys: CurveKeyPair
    allowed_clients: frozenset[str] | None = None  # client public keys; None: any CURVE client


def secure_server(sock: zmq.Socket, config: CurveServerConfig) -> None:
    """Make `sock` a CURVE server; call before bind."""
    sock.curve_secretkey = config.keys.secret_key.encode("ascii")
    sock.curve_publickey = config.keys.public_key.encode("ascii")
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeyPair, server_key: str) -> None:
    """Make `sock` a CURVE client of the server whose public key is `server_key`."""
    sock.curve_secretkey = keys.secret_key.encode("ascii")
    sock.curve_publickey = keys.public_key.encode("ascii")
    sock.curve_serverkey = server_key.encode("ascii")


class _KeyAllowlist:
    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = frozenset(key.encode("ascii") for key in keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys


def start_authenticator(ctx: zmq.Context, config: CurveServerConfig) -> ThreadAuthenticator | None:
    """Enforce `allowed_clients` on the CURVE servers of `ctx`; stop it before `ctx.term()`."""
    if config.allowed_clients is None:
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(
        domain="*", credentials_provider=_KeyAllowlist(config.allowed_clients)
    )
    return auth


# --- key files: `kvroute keygen PATH` writes PATH (secret) and PATH.pub --------

Z85_KEY_CHARS = 40


class CurveKeyFileError(ValueError):
    """A key file that is missing, malformed or readable by others."""


def _z85_key(text: str, source: str) -> str:
    key = text.strip()
    if len(key) != Z85_KEY_CHARS:
        raise CurveKeyFileError(f"{source}: expected a {Z85_KEY_CHARS}-character Z85 key")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise CurveKeyFileError(f"{source}: not a Z85 key") from None
    return key


def write_key_pair(path: str | Path) -> CurveKeyPair:
    """A new key pair: the secret key in `path` (created with mode 0600, never
    overwritten), the public key in `path.pub`."""
    path = Path(path)
    public = Path(f"{path}.pub")
    for target in (path, public):
        if target.exists():
            raise CurveKeyFileError(f"{target} exists; keygen never overwrites a key")
    keys = CurveKeyPair.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(keys.secret_key + "\n")
    public.write_text(keys.public_key + "\n")
    return keys


def read_key_pair(path: str | Path) -> CurveKeyPair:
    """The key pair whose secret key `path` holds (the public key is derived from it).
    Refused if the file is readable or writable by anyone but its owner."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise CurveKeyFileError(f"{path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CurveKeyFileError(f"{path}: a secret key must be private to its owner (chmod 600)")
    secret = _z85_key(text, str(path))
    public = zmq.curve_public(secret.encode("ascii")).decode("ascii")
    return CurveKeyPair(public, secret)


def read_public_keys(path: str | Path) -> frozenset[str]:
    """Client public keys, one Z85 key a line (blank lines and `#` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CurveKeyFileError(f"{path}: {exc.strerror}") from None
    keys = frozenset(
        _z85_key(line, f"{path} line {n}")
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not keys:
        raise CurveKeyFileError(f"{path}: no public keys")
    return keys
