"""Throughput benchmarks: fasttl beside the ways users do the same thing today."""
