"""`python -m reranker.gpu prepare`: everything the GPU run needs, written into one ignored folder.

The GPU machine reaches no package registry, lacks faiss, tantivy, gguf and the model packages, and takes at most
64 MiB per call (the repository included). So everything it needs goes into one folder, `<out>/assets`, which is
archived and cut into parts of PART_BYTES: one part per call, back to back (the machine keeps /tmp between
them while it stays warm), the last call reassembling the archive and running the job.

    <out>/assets/manifest.json              what is where, the parts' count and the archive's SHA-256
    <out>/assets/model/<gguf>               the bundled reranker model (SmolLM2)
    <out>/assets/embedder/                  all-MiniLM-L6-v2, its weights in fp16 (half the bytes to carry;
                                            the embedder runs in fp16 on CUDA anyway, retriever.embedder)
    <out>/assets/wheels/*.whl               what the GPU image lacks or holds at other versions (WHEELS)
    <out>/assets/data.tar.gz                the collections (corpus, queries, qrels)
    <out>/assets/evidence/                  deploy.evidence files: candidates the score stage reranks
    <out>/part-1/ ... <out>/part-N/         the archive's parts (each with the manifest beside it)

`--data` is the collection the capacity stage serves and training starts from; the `--also` ones are ingested
too and join training (reranker.training.train --also); the evidence files' collections are carried for their
texts.
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

from common.files import read_json
from common.paths import REPO_ROOT, SCIFACT, SHARED_DATA
from reranker.gpu.score import evidence_files
from reranker.model import default_model_file

# What the GPU image lacks (faiss, tantivy, gguf, the gRPC health/reflection services, OpenTelemetry) or holds
# at another version than the generated code and adapters need (grpcio, protobuf, peft).
PURE_WHEELS = ("gguf==0.19.0", "peft==0.21.2", "grpcio-health-checking==1.85.1", "grpcio-reflection==1.85.1",
               "protobuf==7.36.2", "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
               "opentelemetry-semantic-conventions==0.66b2", "opentelemetry-proto==1.45.2",
               "opentelemetry-exporter-otlp-proto-common==1.45.2", "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
               "opentelemetry-instrumentation==0.66b2", "opentelemetry-instrumentation-grpc==0.66b2",
               "opentelemetry-exporter-otlp-common==0.66b2", "googleapis-common-protos==1.76.0")
BINARY_WHEELS = ("faiss-cpu==1.15.1", "tantivy==0.27.0", "grpcio==1.85.3", "wrapt==2.5.2")
GPU_PYTHON = "3.12"  # the GPU image's interpreter (binary wheels are fetched for it)
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_BYTES = 54 << 20  # + the repository (~8 MiB) per call: under the 64 MiB a call carries
EVIDENCE = REPO_ROOT / "bench-results" / "quality" / "evidence"  # the committed tuning and test evidence
DATA_FILES = ("corpus.jsonl", "queries.jsonl")


def copy_embedder(source: Path, out: Path) -> None:
    """The encoder directory with its float weights stored as fp16."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", ".gitattributes", "README.md"))
    for weights in source.glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, out / weights.name, metadata={"format": "pt"})


def download_wheels(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    subprocess.run([*base, *PURE_WHEELS], check=True)
    platforms = [arg for p in GPU_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*base, "--python-version", GPU_PYTHON, "--implementation", "cp", *platforms, *BINARY_WHEELS],
                   check=True)
    return sorted(p.name for p in out.glob("*.whl"))


def pack_data(collections: list[Path], out: Path) -> None:
    """Each collection's corpus, queries and qrels (every split it has), under the collection's name."""
    with tarfile.open(out, "w:gz") as tar:
        for data in collections:
            for name in DATA_FILES:
                tar.add(data / name, arcname=f"{data.name}/{name}")
            for qrels in sorted((data / "qrels").glob("*.tsv")):
                tar.add(qrels, arcname=f"{data.name}/qrels/{qrels.name}")


def split_archive(assets: Path, out: Path) -> tuple[int, str]:
    """assets/ as an uncompressed tar (its big files are compressed already) cut into part-1..part-N."""
    archive = out / "assets.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(assets, arcname="assets")
    digest = hashlib.sha256()
    count = 0
    with open(archive, "rb") as src:
        while chunk := src.read(PART_BYTES):
            count += 1
            digest.update(chunk)
            (out / f"part-{count}").mkdir()
            (out / f"part-{count}" / f"assets.tar.part-{count}").write_bytes(chunk)
    archive.unlink()
    return count, digest.hexdigest()


def copy_evidence(source: Path, out: Path) -> list[str]:
    """The evidence files; returns the collections they are of."""
    out.mkdir(parents=True)
    collections = []
    for path in evidence_files(source):
        shutil.copy2(path, out / path.name)
        collections.append(read_json(path)["collection"])
    return collections


def prepare(args: argparse.Namespace) -> dict:
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    assets = out / "assets"
    (assets / "model").mkdir(parents=True)
    model = args.model or default_model_file()
    shutil.copy2(model, assets / "model" / model.name)
    also = [SHARED_DATA / "nfcorpus"] if args.also is None else args.also
    manifest: dict = {"model_file": model.name, "collection": args.data.name, "also": [d.name for d in also]}
    if args.embedder:
        from retriever.embedder import default_model_path

        copy_embedder(default_model_path(), assets / "embedder")
    manifest["wheels"] = download_wheels(assets / "wheels") if args.wheels else []
    scored = copy_evidence(args.evidence, assets / "evidence")
    collections = {d.name: d for d in (args.data, *also)}
    for name in scored:  # the evidence's collections lie beside --data (the shared data folder)
        collections.setdefault(name, args.data.parent / name)
    pack_data(list(collections.values()), assets / "data.tar.gz")
    manifest["collections"] = sorted(collections)
    (assets / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["parts"], manifest["sha256"] = split_archive(assets, out)
    for part in range(1, manifest["parts"] + 1):  # each call can tell what it carries and what must be there
        (out / f"part-{part}" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--model", type=Path, default=None, help="default: the bundled SmolLM2 GGUF")
    p.add_argument("--data", type=Path, default=SCIFACT, help="the collection trained and scored on")
    p.add_argument("--also", type=Path, action="append", default=None,
                   help="more collections carried (default: NFCorpus; repeatable)")
    p.add_argument("--evidence", type=Path, default=EVIDENCE,
                   help="deploy.evidence files whose candidates the score stage reranks; their collections lie "
                        "beside --data")
    p.add_argument("--no-wheels", dest="wheels", action="store_false", help="dry runs: the packages are here")
    p.add_argument("--no-embedder", dest="embedder", action="store_false",
                   help="dry runs: the embedder package is here")

