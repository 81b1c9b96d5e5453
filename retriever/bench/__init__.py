"""Retriever benchmarks (`python -m retriever.bench`); need the `[bench]` extra. Serving code never
imports this package."""
