"""Reproducible benchmarks; run each as a module: python -m benchmarks.<name>."""
