"""Offline reranker tooling: LoRA fine-tuning (`python -m reranker.training.train`), scoring layer,
heads and fusion weight selection (`python -m reranker.training.select_layer`), first-stage candidate
lists, and derived or merged adapters for tests and sizing. Needs the `[train]` extra; serving code
never imports this package."""
