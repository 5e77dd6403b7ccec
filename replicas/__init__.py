"""replicas package."""
