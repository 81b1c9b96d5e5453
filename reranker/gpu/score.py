"""`python -m reranker.gpu score` (on the GPU, or any device and dtype): adapters' scores over the candidates
of evidence files.

An evidence file (`deploy.evidence collect`, bench-results/quality/evidence/) holds, per judged query of one
collection's split, the first stage's top 100 (ids and scores) and the reranker's scores of its head. `score`
reranks the same heads with each adapter given and writes, per adapter, the same files with those scores in
place of the ones collected: `deploy.evidence choose` then compares adapters on identical candidates, with the
leave-one-collection-out rule and paired-bootstrap intervals, here. No metric code runs on the GPU.

    python -m reranker.gpu score --device cuda --evidence DIR --data-root DIR \
        --adapter gpu=OUT/adapter --adapter shipped=default --out OUT/evidence
    # writes OUT/evidence/<adapter>/<evidence file>, and OUT/evidence/summary.json (queries per second)

With `--device cpu --dtype fp32` and `--dtype bf16` it gives the two dtypes' scores of the same candidates, which
`python -m deploy.evidence compare` sets side by side (docs/benchmarks.md#reranker-dtype-on-the-cpu).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.beir import iter_corpus, load_queries
from common.device import Dtype, describe_device
from common.files import read_json, write_json
from common.types import Document
from reranker.engine import Reranker, RerankerConfig
from reranker.model import LoadedModel
from reranker.tenants import EquivalenceMode

BATCH = 8  # prompts per forward


def evidence_files(folder: Path) -> list[Path]:
    """The evidence files in `folder` (JSON, gzipped or not), in name order."""
    return sorted(p for p in folder.iterdir() if p.name.endswith((".json", ".json.gz")))


def rescored(reranker: Reranker, evidence: dict, data: Path, depth: int, max_queries: int) -> dict:
    """The evidence with the model scores of each query's first `depth` candidates (0: as many as it holds)
    computed by `reranker`."""
    corpus: dict[str, Document] = {d.id: d for d in iter_corpus(data)}
    texts = load_queries(data)
    depth = depth or int(evidence["depth"])
    query_ids = list(evidence["queries"])[:max_queries or None]
    handle = reranker.handle()
    queries: dict[str, dict] = {}
    for lo in range(0, len(query_ids), BATCH):
        batch = query_ids[lo:lo + BATCH]
        heads = [evidence["queries"][q]["ids"][:depth] for q in batch]
        prompts = [reranker.build_prompt(texts[q], [(corpus[i].title, corpus[i].text) for i in head], handle)
                   for q, head in zip(batch, heads, strict=True)]
        for q, scores in zip(batch, reranker.score_prompts(prompts, [handle] * len(batch)), strict=True):
            queries[q] = {**evidence["queries"][q], "model": scores}
    return {**evidence, "depth": depth, "queries": queries,
            "qrels": {q: rel for q, rel in evidence["qrels"].items() if q in queries}}


def score(args: argparse.Namespace) -> dict:
    files = evidence_files(args.evidence)
    summary: dict = {"adapters": {}, "files": [p.name for p in files]}
    loaded: LoadedModel | None = None
    for spec in args.adapter:
        name, path = spec.split("=", 1)
        if path != "default" and not (Path(path) / "adapter_config.json").exists():
            summary["adapters"][name] = {"missing": path}
            continue
        reranker = Reranker(RerankerConfig(device=args.device, dtype=Dtype(args.dtype), adapter=path,
                                           equivalence=EquivalenceMode.OFF), loaded=loaded)
        loaded = reranker.lm
        summary["device"], summary["dtype"] = describe_device(reranker.lm.device), str(reranker.lm.dtype)
        entry: dict = {"path": path, "fusion_weight": reranker.handle().settings.fusion_weight, "queries_per_s": {}}
        summary["adapters"][name] = entry
        for file in files:
            evidence = read_json(file)
            start = time.perf_counter()
            result = rescored(reranker, evidence, args.data_root / evidence["collection"], args.depth,
                              args.max_queries)
            entry["queries_per_s"][file.name] = len(result["queries"]) / (time.perf_counter() - start)
            write_json(args.out / name / file.name, result)
            print(f"{name} {file.name}: {len(result['queries'])} queries, "
                  f"{entry['queries_per_s'][file.name]:.1f} queries/s", flush=True)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # a cut run keeps it
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="the reranker's (auto: bf16 on a GPU or a CPU with native bf16)")
    p.add_argument("--evidence", type=Path, required=True, help="a folder of evidence files (deploy.evidence)")
    p.add_argument("--data-root", type=Path, required=True, help="the folder holding each collection's BEIR dir")
    p.add_argument("--adapter", action="append", required=True, help="NAME=PATH (PATH 'default': the shipped one)")
    p.add_argument("--depth", type=int, default=0, help="candidates reranked per query (0: the evidence's depth)")
    p.add_argument("--max-queries", type=int, default=0, help="per file (dry runs; 0: all)")
    p.add_argument("--out", type=Path, required=True)
