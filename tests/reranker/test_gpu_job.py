"""The GPU job's dry run: `prepare` and `run --tiny` on CPU, end to end, so the GPU run is never the first."""

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from common.beir import iter_corpus, load_qrels, load_queries
from reranker.adapters import held_out_query_ids
from reranker.gpu import prepare
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


def tiny_evidence(data: Path, split: str, out: Path) -> None:
    """An evidence file (deploy.evidence's layout) of the tiny collection: each judged query's first stage is
    the whole corpus in file order, nothing reranked yet."""
    ids = [d.id for d in iter_corpus(data)]
    qrels = load_qrels(data, split)
    queries = {q: {"ids": ids, "first_stage": [1.0 - i / len(ids) for i in range(len(ids))], "model": []}
               for q in qrels}
    out.write_text(json.dumps({"collection": data.name, "split": split, "depth": 0, "qrels": qrels,
                               "queries": queries}))


def gpu_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "reranker.gpu", *args], cwd=ROOT, check=True, timeout=1200)


@pytest.mark.long
def test_prepare_and_the_remote_script_dry_run(tmp_path):
    """prepare's parts, reassembled and run by remote.sh as on the GPU machine (stash, then run --tiny)."""
    data = tiny_collection(tmp_path)
    also = shutil.copytree(data, tmp_path / "tinyalso")
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    for split in ("train", "test"):
        tiny_evidence(data, split, evidence / f"tiny-{split}.json")
    assets = tmp_path / "gpu"
    gpu_cli("prepare", "--out", str(assets), "--data", str(data), "--also", str(also), "--evidence", str(evidence),
            "--no-wheels", "--no-embedder")
    manifest = json.loads((assets / "part-1" / "manifest.json").read_text())
    parts = sorted(assets.glob("part-*/assets.tar.part-*"))
    assert len(parts) == manifest["parts"] >= 2  # the model alone outweighs one part
    assert all(p.stat().st_size <= prepare.PART_BYTES for p in parts)
    assert manifest["collections"] == ["tiny", "tinyalso"]

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "GPU_PARTS": str(assets), "KEEP": str(tmp_path / "keep"),
           "WORK": str(tmp_path / "work")}
    for part in parts[:-1]:  # the calls before the last carry one part each
        carried = tmp_path / "carried"
        (carried / part.parent.name).mkdir(parents=True)
        shutil.move(part, carried / part.parent.name / part.name)
        shutil.copy2(part.parent / "manifest.json", carried / part.parent.name)
        subprocess.run(["bash", "reranker/gpu/remote.sh", "stash"], cwd=ROOT, check=True, timeout=120,
                       env={**env, "GPU_PARTS": str(carried)})
        shutil.rmtree(carried)
    # Two calls, as on the GPU machine: the second reuses what the first unpacked and produced.
    first = ("serve", "speed", "train", "profile", "tenants")
    for stages in (first, ("score",)):
        subprocess.run(["bash", "reranker/gpu/remote.sh", "run", str(out)], cwd=ROOT, check=True, timeout=1200,
                       env={**env, "JOB_ARGS": " ".join(["--tiny", "--stages", *stages])})
        summary = json.loads((tmp_path / "work" / "out" / "summary.json").read_text())
        assert {name: s["status"] for name, s in summary["stages"].items()} == {name: "ok" for name in stages}
    work = tmp_path / "work" / "out"
    capacity = json.loads((work / "capacity" / "gpu_capacity.json").read_text())
    assert [r["config"] for r in capacity] == ["rerank 4", "search + rerank 4"]
    assert all(r["capacity_rps"] > 0 and r["requests_per_forward"] >= 1 for r in capacity), capacity
    speed = json.loads((work / "reranker_speed.json").read_text())
    assert [r["n_docs"] for r in speed["results"]] == [2, 4] and all(r["blockrank_s"] > 0 for r in speed["results"])
    assert "kernel launches" in (work / "profile.txt").read_text()
    assert [r["tenants"] for r in json.loads((work / "reranker_tenants.json").read_text())["results"]] == [1, 2]
    meta = json.loads((work / "adapter" / "blockrank.json").read_text())
    assert meta["block_tokens"] == 32 and meta["settings"]["steps"] == 3
    assert meta["settings"]["also"] == [str(tmp_path / "work" / "data" / "tinyalso")]
    for adapter in ("gpu", "shipped"):  # every query of every evidence file rescored by both adapters
        for split in ("train", "test"):
            rescored = json.loads((work / "evidence" / adapter / f"tiny-{split}.json").read_text())
            kept = list(rescored["queries"].values())
            assert len(kept) == 2 and all(len(q["model"]) == 4 for q in kept) and rescored["depth"] == 4
    with tarfile.open(out / "gpu-results.tar.gz") as tar:  # what comes back: results and logs, not the index
        names = tar.getnames()
    assert "gpu/capacity/gpu_capacity.json" in names and "gpu/services/logs/reranker.log" in names
    assert not [n for n in names if n.startswith("gpu/services/retriever")]


# What the GPU machine lacks: the retriever's engines, the gRPC layer (its generated code is not carried), metric
# and embedding libraries.
GPU_MISSING = ("faiss", "tantivy", "grpc", "services", "ir_measures", "sentence_transformers")  # before the wheels
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
