"""Benchmarks: throughput against the seed's way, against sentence-transformers, on several
devices, and the final rank-and-write; random-weight models of the real architectures."""
