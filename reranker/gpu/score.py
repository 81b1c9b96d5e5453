"""`python -m reranker.gpu score` (on the GPU) and `report` (here): the adapters on SciFact, measured.

`score` runs each adapter over the first-stage candidates of the test queries and of the shipped adapter's
held-out train queries ("dev") and writes the model's scores; no metric code runs there. `report` turns them
into nDCG@10 here with the same fusion the served pipeline applies: the reranker alone, and fused with the
first-stage scores at a weight fitted on the dev queries (never on test).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from common.beir import load_qrels
from common.device import describe_device
from reranker.adapters import held_out_query_ids
from reranker.engine import Reranker, RerankerConfig
from reranker.gpu.job import SHIPPED_META
from reranker.model import LoadedModel
from reranker.ranking import fuse
from reranker.tenants import EquivalenceMode
from reranker.training.candidates import Candidates, load_candidates

BATCH = 4  # prompts per forward
WEIGHTS = [round(0.05 * i, 2) for i in range(21)]


def candidate_splits(assets: Path, data: Path, dev_meta: Path, max_queries: int,
                     depth: int | None = None) -> dict[str, list[Candidates]]:
    """Test queries and the held-out train ("dev") queries, their first-stage candidates cut to `depth`."""
    held_out = held_out_query_ids(dev_meta)
    train = load_candidates(assets / "candidates-train.jsonl.gz", data, depth)
    splits = {"test": load_candidates(assets / "candidates-test.jsonl.gz", data, depth),
              "dev": [c for c in train if c.query_id in held_out]}
    return {k: v[:max_queries] if max_queries else v for k, v in splits.items()}


def score_split(reranker: Reranker, candidates: list[Candidates]) -> tuple[dict[str, list[float]], float]:
    """Model scores per query (aligned with the candidate order) and queries per second."""
    handle = reranker.handle()
    out: dict[str, list[float]] = {}
    start = time.perf_counter()
    for lo in range(0, len(candidates), BATCH):
        batch = candidates[lo:lo + BATCH]
        prompts = [reranker.build_prompt(c.query, [(d.title, d.text) for d in c.documents], handle) for c in batch]
        for c, scores in zip(batch, reranker.score_prompts(prompts, [handle] * len(batch)), strict=True):
            out[c.query_id] = scores
    return out, len(candidates) / (time.perf_counter() - start)


def score(args: argparse.Namespace) -> dict:
    splits = candidate_splits(args.assets, args.data, SHIPPED_META, args.max_queries, args.depth or None)
    result: dict = {"doc_ids": {s: {c.query_id: [d.id for d in c.documents] for c in cands}
                                for s, cands in splits.items()}, "adapters": {}}
    loaded: LoadedModel | None = None
    for spec in args.adapter:
        name, path = spec.split("=", 1)
        if path != "default" and not (Path(path) / "adapter_config.json").exists():
            result["adapters"][name] = {"missing": path}
            continue
        reranker = Reranker(RerankerConfig(device=args.device, adapter=path, equivalence=EquivalenceMode.OFF),
                            loaded=loaded)
        loaded = reranker.lm
        settings = reranker.handle().settings
        entry: dict = {"path": path, "layer": settings.spec.layer, "block_tokens": settings.spec.block_tokens,
                       "fusion_weight": settings.fusion_weight, "scores": {}, "queries_per_s": {}}
        result["adapters"][name] = entry
        result["device"] = describe_device(reranker.lm.device)
        for split, cands in splits.items():
            entry["scores"][split], entry["queries_per_s"][split] = score_split(reranker, cands)
            print(f"{name} {split}: {len(cands)} queries, {entry['queries_per_s'][split]:.1f} queries/s", flush=True)
            write_scores(args.out, result)  # after every split: a run cut short keeps what it scored
    return result


def write_scores(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(result, f)


def ndcg10(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> float:
    import ir_measures
    from ir_measures import nDCG

    judged = {q: rel for q, rel in qrels.items() if q in run}  # the queries scored (all of them, on the GPU run)
    return float(ir_measures.calc_aggregate([nDCG @ 10], judged, run)[nDCG @ 10])


def report(args: argparse.Namespace) -> dict:
    """nDCG@10 per adapter: first stage, reranker alone, and fused at the dev-fitted weight, on test and dev."""
    with gzip.open(args.scores, "rt") as f:
        scored = json.load(f)
    first = {s: {c.query_id: c.first_stage_scores for c in cands}
             for s, cands in candidate_splits(args.assets, args.data, args.dev_meta, 0).items()}
    qrels = {"test": load_qrels(args.data, "test"), "dev": load_qrels(args.data, "train")}

    def run_of(split: str, scores: dict[str, list[float]], weight: float | None) -> dict[str, dict[str, float]]:
        ids = scored["doc_ids"][split]
        return {q: dict(zip(ids[q], s if weight is None else fuse(s, first[split][q][:len(s)], weight),
                            strict=True)) for q, s in scores.items()}

    out: dict = {"device": scored.get("device"), "first_stage": {}, "adapters": {},
                 "queries": {split: len(ids) for split, ids in scored["doc_ids"].items()}}
    for split in ("test", "dev"):
        ids = scored["doc_ids"][split]
        out["first_stage"][split] = ndcg10({q: dict(zip(ids[q], first[split][q][:len(ids[q])], strict=True))
                                            for q in ids}, qrels[split])
    for name, entry in scored["adapters"].items():
        if set(entry.get("scores", {})) != {"test", "dev"}:
            continue
        grid = {w: ndcg10(run_of("dev", entry["scores"]["dev"], w), qrels["dev"]) for w in WEIGHTS}
        fitted = max(grid, key=lambda w: (grid[w], w))
        row = {"dev_fitted_weight": fitted, "dev_grid": grid, "configured_weight": entry["fusion_weight"],
               "queries_per_s": entry["queries_per_s"]}
        for split in ("test", "dev"):
            row[f"{split}_alone"] = ndcg10(run_of(split, entry["scores"][split], None), qrels[split])
            row[f"{split}_fused_fitted"] = ndcg10(run_of(split, entry["scores"][split], fitted), qrels[split])
            if entry["fusion_weight"] is not None:
                row[f"{split}_fused_configured"] = ndcg10(run_of(split, entry["scores"][split],
                                                                 entry["fusion_weight"]), qrels[split])
        out["adapters"][name] = row
    return out
