"""replicas/kv_cache package."""
