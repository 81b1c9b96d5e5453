"""The reranker's GPU job, prepared on CPU and run in one go on a lent GPU machine (docs/gpu.md).

    python -m reranker.gpu prepare --out .gpu      # here: model file in two parts, wheels, data, candidates
    python -m reranker.gpu run --assets .gpu ...   # there: CUDA tests, speed, tenants, training, scoring
    python -m reranker.gpu report --scores FILE    # here: nDCG@10 of the returned scores, tables for the docs
"""
