"""The reranker's GPU job, prepared on CPU and run on a lent GPU machine (docs/gpu.md).

    python -m reranker.gpu prepare --out .gpu      # here: models, wheels, data, evidence, cut into parts
    python -m reranker.gpu run --assets DIR ...    # there: capacity, speed, training, scoring, profile, tests
    python -m deploy.evidence choose ...           # here: the returned scores, compared by leave-one-out
"""
