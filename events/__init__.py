"""The contract between replicas and the router: KV cache event structs and their codec,
a replica's load and its codec, block-hash functions (`events.hashing`), and the ZeroMQ
publisher and subscriber."""

from kvroute.events.curve import CurveKeyPair, CurveServerConfig
from kvroute.events.endpoints import offset_endpoint
from kvroute.events.errors import MalformedInputError, MalformedKind
from kvroute.events.kv_events import (
    DEFAULT_LIMITS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeLimits,
    KVCacheEvent,
    KVEventBatch,
    KVEventDecoder,
    KVEventEncoder,
    WireEncoding,
    decode_batch,
    encode_batch,
)
from kvroute.events.load import ReplicaLoad, decode_load, encode_load
from kvroute.events.publisher import PublisherConfig, PublisherStats, ZmqEventPublisher
from kvroute.events.sequencer import RecoveryConfig, ResyncReason, SourceState, SourceStats
from kvroute.events.source import SourceSpec
from kvroute.events.subscriber import SubscriberConfig, ZmqEventSubscriber

__all__ = [
    "DEFAULT_LIMITS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CurveKeyPair",
    "CurveServerConfig",
    "DecodeLimits",
    "KVCacheEvent",
    "KVEventBatch",
    "KVEventDecoder",
    "KVEventEncoder",
    "MalformedInputError",
    "MalformedKind",
    "PublisherConfig",
    "PublisherStats",
    "RecoveryConfig",
    "ReplicaLoad",
    "ResyncReason",
    "SourceSpec",
    "SourceState",
    "SourceStats",
    "SubscriberConfig",
    "WireEncoding",
    "ZmqEventPublisher",
    "ZmqEventSubscriber",
    "decode_batch",
    "decode_load",
    "encode_batch",
    "encode_load",
    "offset_endpoint",
]
