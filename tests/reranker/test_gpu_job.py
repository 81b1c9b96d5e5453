"""The GPU job's dry run: `prepare` and `run --tiny` on CPU, end to end, so the GPU run is never the first."""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.beir import iter_corpus, load_qrels, load_queries
from reranker.adapters import held_out_query_ids
from reranker.gpu.job import SHIPPED_META
from tests.conftest import ROOT, SCIFACT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def tiny_collection(root: Path) -> Path:
    """A BEIR directory from SciFact: 3 train queries the shipped adapter held out (its dev queries), 3 it
    trained on, 3 test queries, their relevant documents and 40 others."""
    held_out = held_out_query_ids(SHIPPED_META)
    train, test = load_qrels(SCIFACT, "train"), load_qrels(SCIFACT, "test")
    train_ids = [q for q in train if q in held_out][:3] + [q for q in train if q not in held_out][:3]
    test_ids = list(test)[:3]
    wanted = {d for q in train_ids for d in train[q]} | {d for q in test_ids for d in test[q]}
    docs = [d for d in iter_corpus(SCIFACT) if d.id in wanted]
    docs += [d for d in iter_corpus(SCIFACT) if d.id not in wanted][:40]
    out = root / "tiny"
    (out / "qrels").mkdir(parents=True)
    with open(out / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n")
    queries = load_queries(SCIFACT)
    with open(out / "queries.jsonl", "w") as f:
        for q in train_ids + test_ids:
            f.write(json.dumps({"_id": q, "text": queries[q]}) + "\n")
    for split, ids, qrels in (("train", train_ids, train), ("test", test_ids, test)):
        with open(out / "qrels" / f"{split}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["query-id", "corpus-id", "score"])
            w.writerows([q, d, s] for q in ids for d, s in qrels[q].items())
    return out


def gpu_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "reranker.gpu", *args], cwd=ROOT, check=True, timeout=1200)


@pytest.mark.long
def test_prepare_run_and_report_dry_run(tmp_path):
    data = tiny_collection(tmp_path)
    assets = tmp_path / "assets"
    gpu_cli("prepare", "--out", str(assets), "--data", str(data), "--retriever-dir", str(tmp_path / "retriever"),
            "--collection", "tiny", "--depth", "8", "--no-wheels")
    manifest = json.loads((assets / "b" / "manifest.json").read_text())
    parts = [assets / "a" / "model.part-a", assets / "b" / "model.part-b"]
    assert sum(p.stat().st_size for p in parts) == manifest["model_bytes"]
    assert manifest["train_queries"] == 6 and manifest["test_queries"] == 3
    with gzip.open(assets / "b" / "candidates-test.jsonl.gz", "rt") as f:
        assert all(len(json.loads(line)["doc_ids"]) == 8 for line in f)

    out = tmp_path / "out"
    gpu_cli("run", "--tiny", "--assets", str(assets / "b"), "--data", str(data), "--out", str(out),
            "--archive", str(tmp_path / "results.tar.gz"))
    summary = json.loads((out / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == \
        {name: "ok" for name in ("speed", "profile", "tenants", "train", "score")}
    speed = json.loads((out / "reranker_speed.json").read_text())
    assert [r["n_docs"] for r in speed["results"]] == [2, 4] and all(r["blockrank_s"] > 0 for r in speed["results"])
    assert "kernel launches" in (out / "profile.txt").read_text()
    assert [r["tenants"] for r in json.loads((out / "reranker_tenants.json").read_text())["results"]] == [1, 2]
    meta = json.loads((out / "adapter" / "blockrank.json").read_text())
    assert meta["block_tokens"] == 32 and meta["settings"]["steps"] == 3
    assert (tmp_path / "results.tar.gz").stat().st_size > 0

    report = tmp_path / "report.json"
    gpu_cli("report", "--scores", str(out / "scores.json.gz"), "--assets", str(assets / "b"), "--data", str(data),
            "--out", str(report))
    result = json.loads(report.read_text())
    assert set(result["adapters"]) == {"shipped", "gpu"}
    for row in result["adapters"].values():
        for key in ("test_alone", "test_fused_fitted", "dev_alone", "dev_fused_fitted"):
            assert 0.0 <= row[key] <= 1.0
    assert result["first_stage"]["test"] > 0.0


# What the GPU machine lacks: the retriever's engines, the gRPC layer (its generated code is not carried), metric
# and embedding libraries.
GPU_MISSING = ("faiss", "tantivy", "grpc", "services", "ir_measures", "sentence_transformers")
GPU_MODULES = ("reranker.gpu.__main__", "reranker.training.train", "reranker.bench.__main__", "tests.conftest",
               "tests.reranker.test_cuda", "tests.reranker.test_attention", "tests.reranker.test_blockrank")


def test_the_gpu_job_imports_without_what_the_gpu_machine_lacks():
    script = f"""
import importlib, importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {GPU_MISSING!r}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Missing())
for module in {GPU_MODULES!r}:
    importlib.import_module(module)
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
