"""Reranker benchmarks (`python -m reranker.bench speed|tenants`); need the `[bench]` extra. Serving
code never imports this package."""
