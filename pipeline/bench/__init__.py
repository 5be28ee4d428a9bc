"""Benchmarks: throughput against the naive Hugging Face recipe, against sentence-transformers, on several
devices, and the final rank-and-write; random-weight models of the real architectures."""
