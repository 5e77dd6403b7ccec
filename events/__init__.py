"""The contract between replicas and the router: KV cache event structs and their codec,
block-hash functions (`events.hashing`), and the ZeroMQ publisher and subscriber."""

from events.curve import CurveKeyPair, CurveServerConfig
from events.endpoints import offset_endpoint
from events.errors import MalformedInputError, MalformedKind
from events.kv_events import (
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
from events.publisher import PublisherConfig, PublisherStats, ZmqEventPublisher
from events.sequencer import RecoveryConfig, ResyncReason, SourceState, SourceStats
from events.source import SourceSpec
from events.subscriber import SubscriberConfig, ZmqEventSubscriber

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
    "ResyncReason",
    "SourceSpec",
    "SourceState",
    "SourceStats",
    "SubscriberConfig",
    "WireEncoding",
    "ZmqEventPublisher",
    "ZmqEventSubscriber",
    "decode_batch",
    "encode_batch",
    "offset_endpoint",
]
