"""The router service: the core wired to engines, event streams, peers and metrics."""
