"""Golden bytes from docs/vectors.md (measured against vLLM 0.23.0 and 0.24+)."""

from __future__ import annotations

from kvroute.events.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

GOLDEN_ARRAY_HEX = (
    "93cb41d954fc40200000949cab426c6f636b53746f72656491cf1122334455667788c094010203"
    "0404c0a3475055c0c0c0c0c09cab426c6f636b53746f726564910706940506070804c0a3475055"
    "c09192a8696d672d686173680001ae736c6964696e675f77696e646f77cc8094ac426c6f636b52"
    "656d6f76656491cf1122334455667788a34750550091b0416c6c426c6f636b73436c6561726564"
    "00"
)

GOLDEN_MAP_HEX = (
    "93cb41d954fc402000009488a474797065ab426c6f636b53746f726564ac626c6f636b5f686173"
    "68657391cf1122334455667788b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f"
    "6964739401020304aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da34750"
    "55a96c6f72615f6e616d65c08ca474797065ab426c6f636b53746f726564ac626c6f636b5f6861"
    "736865739107b1706172656e745f626c6f636b5f6861736806a9746f6b656e5f69647394050607"
    "08aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f"
    "6e616d65c0aa65787472615f6b6579739192a8696d672d6861736800a967726f75705f69647801"
    "b26b765f63616368655f737065635f6b696e64ae736c6964696e675f77696e646f77bc6b765f63"
    "616368655f737065635f736c6964696e675f77696e646f77cc8084a474797065ac426c6f636b52"
    "656d6f766564ac626c6f636b5f68617368657391cf1122334455667788a66d656469756da34750"
    "55a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400"
)

GOLDEN_ARRAY = bytes.fromhex(GOLDEN_ARRAY_HEX)
GOLDEN_MAP = bytes.fromhex(GOLDEN_MAP_HEX)


def golden_batch() -> KVEventBatch:
    """The batch both golden payloads encode."""
    return KVEventBatch(
        ts=1700000000.5,
        events=[
            BlockStored(
                block_hashes=[0x1122334455667788],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4],
                block_size=4,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
            BlockStored(
                block_hashes=[7],
                parent_block_hash=6,
                token_ids=[5, 6, 7, 8],
                block_size=4,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[("img-hash", 0)],
                group_idx=1,
                kv_cache_spec_kind="sliding_window",
                kv_cache_spec_sliding_window=128,
            ),
            BlockRemoved(block_hashes=[0x1122334455667788], medium="GPU", group_idx=0),
            AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
