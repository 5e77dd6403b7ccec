"""A Llama-family decoder in plain torch that computes over paged KV memory.

One module per job: `config` (the architecture and what the executor can
compute), `layers` (norm, rotary, MLP, decoder), `attention` (paged and dense
attention), `kv_memory` (the block manager's K/V tensors), `weights`
(Hugging Face checkpoints) and `sampling`.
"""
