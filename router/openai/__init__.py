"""The OpenAI-compatible front door, shared by the router and serve-replica."""
