"""Optional CurveZMQ encryption and client authentication for the event sockets.

Off by default: our default endpoints are on loopback. A publisher with a
`CurveServerConfig` accepts only clients that complete a CURVE handshake with
its public key, and, when `allowed_clients` is set, only those client keys.
Keys are Z85 text (40 characters), as `zmq.curve_keypair()` makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq
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
