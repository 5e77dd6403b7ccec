"""Packaging: the repository's top-level folders install under one import root, `kvroute`.

`router/`, `replicas/`, `events/`, `configs/` and `benchmarks/` stay top-level folders in the
repository and become `kvroute.router`, `kvroute.replicas`, ... when installed; `kvroute` itself
is a namespace with nothing else in it. Subpackages are found, never listed by hand.
"""

from setuptools import find_packages, setup

ROOTS = ("router", "replicas", "events", "configs", "benchmarks")

setup(
    packages=[f"kvroute.{name}" for name in find_packages(include=[f"{root}*" for root in ROOTS])],
    package_dir={f"kvroute.{root}": root for root in ROOTS},
    package_data={
        "kvroute.configs": ["*.yaml"],
        "kvroute.benchmarks": ["data/traces/*.jsonl.gz", "data/traces/README.md"],
    },
)
