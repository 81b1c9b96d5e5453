"""The reranker's GPU job, prepared on CPU and run in one go on a lent GPU machine (README "GPU run").

    python -m reranker.gpu prepare --out .gpu      # here: model file in two parts, wheels, data, candidates
    python -m reranker.gpu run --assets .gpu ...   # there: CUDA tests, speed, tenants, training, scoring
    python -m reranker.gpu report --results DIR    # here: nDCG@10 of the returned scores, README-ready tables
"""
