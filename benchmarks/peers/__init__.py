"""kvroute against vllm-router and sglang-router on the same engines, in one run.

`python -m benchmarks.peers [--quick]`: the same seeded workloads through every path
(clients round-robin straight to the engines, kvroute, the peers), in alternating
rounds, with the engines' prefix caches reset before every run; one table.
"""
