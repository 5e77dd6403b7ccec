"""The global block index: which engine holds which block, fed by KV events."""
