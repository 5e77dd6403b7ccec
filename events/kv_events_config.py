"""vLLM's `--kv-events-config` JSON, read into a publisher's settings.

The keys and defaults are vLLM's `KVEventsConfig` (`enable_kv_cache_events`,
`publisher`, `endpoint`, `replay_endpoint`, `buffer_steps`, `hwm`,
`max_queue_size`, `topic`); an unknown key or a wrong type is an error naming
it. Two deliberate differences, both about exposure: the default endpoint is
`tcp://127.0.0.1:5557` (vLLM's is `tcp://*:5557`), and an endpoint reachable
off this host (`*`, `0.0.0.0`, any non-loopback address) is refused unless the
sockets use CURVE or the caller explicitly allows events in clear.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kvroute.events.curve import CurveServerConfig
from kvroute.events.endpoints import is_loopback, offset_endpoint
from kvroute.events.publisher import PublisherConfig

Positive = Annotated[int, msgspec.Meta(ge=1)]
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"


class KVEventsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """vLLM's KVEventsConfig. `publisher` None becomes `zmq` when events are
    enabled and `null` otherwise, as in vLLM."""

    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] | None = None
    endpoint: str = DEFAULT_ENDPOINT
    replay_endpoint: str | None = None
    buffer_steps: Positive = 10_000
    hwm: Positive = 100_000
    max_queue_size: Positive = 100_000
    topic: str = ""

    @property
    def publisher_kind(self) -> Literal["null", "zmq"]:
        if self.publisher is not None:
            return self.publisher
        return "zmq" if self.enable_kv_cache_events else "null"


class KVEventsConfigError(ValueError):
    """A --kv-events-config that cannot be used; the message says why."""


def parse_kv_events_config(text: str | None) -> KVEventsConfig:
    """The JSON object of `--kv-events-config` (None or empty: vLLM's default, off)."""
    if text is None or not text.strip():
        return KVEventsConfig()
    try:
        return msgspec.json.decode(text.encode(), type=KVEventsConfig)
    except msgspec.ValidationError as exc:
        raise KVEventsConfigError(f"--kv-events-config: {exc}") from None
    except msgspec.DecodeError as exc:
        raise KVEventsConfigError(f"--kv-events-config is not a JSON object: {exc}") from None


def publisher_config(
    config: KVEventsConfig,
    *,
    data_parallel_rank: int = 0,
    curve: CurveServerConfig | None = None,
    allow_insecure: bool = False,
) -> PublisherConfig | None:
    """The publisher these settings describe, or None when `publisher` is `null`.

    Raises KVEventsConfigError for an endpoint reachable off this host without CURVE
    unless `allow_insecure`: events carry every prompt's token ids."""
    if config.publisher_kind == "null":
        return None
    endpoints = [config.endpoint]
    if config.replay_endpoint is not None:
        endpoints.append(config.replay_endpoint)
    for endpoint in endpoints:
        try:
            offset_endpoint(endpoint, data_parallel_rank)
        except ValueError as exc:
            raise KVEventsConfigError(f"--kv-events-config: {exc}") from None
        if curve is None and not allow_insecure and not is_loopback(endpoint):
            raise KVEventsConfigError(
                f"--kv-events-config: {endpoint} is reachable off this host and would "
                "publish prompts in clear; bind 127.0.0.1, give CURVE keys, or pass "
                "--allow-insecure-events"
            )
    return PublisherConfig(
        endpoint=config.endpoint,
        replay_endpoint=config.replay_endpoint,
        topic=config.topic,
        data_parallel_rank=data_parallel_rank,
        buffer_steps=config.buffer_steps,
        hwm=config.hwm,
        max_queue_size=config.max_queue_size,
        curve=curve,
    )
