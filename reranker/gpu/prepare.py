"""`python -m reranker.gpu prepare`: everything the GPU run needs, written into one ignored folder.

The GPU machine reaches no package registry, has no faiss, gguf or model packages, and takes at most 64 MiB
per call. So: the bundled GGUF is cut into two parts (one per call: the machine keeps the first between
back-to-back calls), the missing wheels are downloaded here, the SciFact files and the first-stage candidates
(hybrid top-`--depth` of the train and test queries, from the real retriever) are written beside them, so the
GPU run needs neither the embedder nor an index.

    <out>/a/model.part-a                      first call
    <out>/b/model.part-b, manifest.json       second call, with:
    <out>/b/wheels/*.whl, <out>/b/data.tar.gz, <out>/b/candidates-{train,test}.jsonl.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from common.paths import SCIFACT, VAR_DIR
from reranker.model import default_model_file
from reranker.training.candidates import first_stage, save_candidates

# Packages the GPU image lacks (gguf: reading the GGUF file) or holds at another version than ours (peft: the
# adapter format). Pure-Python wheels.
WHEELS = ("gguf==0.19.0", "peft==0.21.2")
PART_A_BYTES = 56 << 20  # the first call carries this part and the repository (~5 MiB): under 64 MiB
SPLITS = ("train", "test")
DATA_FILES = ("corpus.jsonl", "queries.jsonl")


def split_model(model: Path, out: Path) -> dict:
    """The model file cut in two at PART_A_BYTES; the manifest names it and its SHA-256 for reassembly."""
    (out / "a").mkdir(parents=True, exist_ok=True)
    (out / "b").mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(model, "rb") as src:
        for part, size in (("a", PART_A_BYTES), ("b", None)):
            chunk = src.read(size) if size else src.read()
            digest.update(chunk)
            (out / part / f"model.part-{part}").write_bytes(chunk)
    return {"model_file": model.name, "model_bytes": model.stat().st_size, "sha256": digest.hexdigest()}


def download_wheels(out: Path) -> list[str]:
    wheels = out / "b" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), *WHEELS], check=True)
    return sorted(p.name for p in wheels.glob("*.whl"))


def pack_data(data: Path, out: Path) -> None:
    """The collection's corpus, queries and train/test qrels as one tarball, under the collection's name."""
    with tarfile.open(out / "b" / "data.tar.gz", "w:gz") as tar:
        for name in DATA_FILES:
            tar.add(data / name, arcname=f"{data.name}/{name}")
        for split in SPLITS:
            tar.add(data / "qrels" / f"{split}.tsv", arcname=f"{data.name}/qrels/{split}.tsv")


def prepare(args: argparse.Namespace) -> dict:
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    manifest = split_model(args.model or default_model_file(), out)
    manifest["wheels"] = download_wheels(out) if args.wheels else []
    pack_data(args.data, out)
    manifest["collection"] = args.data.name
    for split in SPLITS:
        candidates = first_stage(args.data, split, args.depth, args.retriever_dir, args.collection,
                                 max_queries=args.max_queries)
        save_candidates(out / "b" / f"candidates-{split}.jsonl.gz", candidates)
        manifest[f"{split}_queries"] = len(candidates)
    manifest["depth"] = args.depth
    (out / "b" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--model", type=Path, default=None, help="default: the bundled SmolLM2 GGUF")
    p.add_argument("--data", type=Path, default=SCIFACT)
    p.add_argument("--depth", type=int, default=100, help="first-stage candidates per query")
    p.add_argument("--max-queries", type=int, default=None, help="per split (dry runs)")
    p.add_argument("--retriever-dir", type=Path, default=VAR_DIR / "retriever")
    p.add_argument("--collection", default="scifact")
    p.add_argument("--no-wheels", dest="wheels", action="store_false", help="dry runs: the packages are here")
