"""`python -m reranker.gpu run`: the whole GPU job, stage by stage, each a subprocess with its own time limit.

A stage that fails or runs out of time is recorded and the next one starts; after every stage the output
folder is archived (when --archive is given), so whatever finished comes back even if the call is cut short.
`--tiny` runs the same stages at toy sizes on whatever device there is: the CPU dry run in the test suite.

Stages, in this order, most wanted first (outputs under --out; versions and the device in summary.json):
    serve    the three services on the box, capacity under p99 100 ms (deploy.gpu_capacity)
                                                                        capacity/gpu_capacity.json/.md
             its retriever, every carried collection ingested, then serves `train` its negatives
    speed    BlockRank vs full attention (eager and in CUDA graphs), 10..500 x 160-token blocks
                                                                        reranker_speed.json/.png
    train    LoRA fine-tuning on the carried collections' train queries and inverse-cloze pseudo-queries of
             their corpora, the shipped adapter's recipe (8 documents x 96 tokens, dense top-30 negatives),
             as many steps as the time budget holds                     adapter/
    score    the new and the shipped adapter over the evidence files' candidates (deploy.evidence: the
             tuning splits, and test splits of collections never tuned on), top 20   evidence/<adapter>/
    profile  where one 100-document rerank spends its time             profile.txt
    tests    the CUDA tests (pytest --device cuda)                     tests.log
    tenants  1/4/16 tenants as shared blocks vs one model per tenant   reranker_tenants.json/.png
`--stages` picks some of them (same order).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.device import describe_device, resolve_device
from reranker.adapters import ADAPTER_META, DEFAULT_ADAPTER

# The shipped adapter's held-out train queries: the new adapter holds out the same ones, so both are compared
# on queries neither saw.
SHIPPED_META = DEFAULT_ADAPTER / ADAPTER_META
SERVICES = "services"  # under --out: the serve stage's data and logs
SERVED_DEPTH = 20  # candidates the gateway reranks by default (deploy.eval's --rerank-depth)
# The CUDA-only module and the device-aware equivalence tests (the rest of the suite runs on CPU, in CI).
CUDA_TESTS = ["tests/reranker/test_cuda.py", "tests/reranker/test_kernels.py",
              "tests/reranker/test_model_families.py", "tests/reranker/test_blockrank.py"]


@dataclass(frozen=True)
class Sizes:
    """What each stage runs; GPU is the real job, TINY the dry run."""

    n_docs: str
    block_tokens: int  # speed, profile
    train_block_tokens: int
    repeats: int
    tenants: str
    requests: int
    tenant_docs: int  # documents per request in the tenants benchmark (20, as in the CPU figures)
    train_docs: int
    train_steps: int
    train_budget_s: float
    pseudo_queries: int  # inverse-cloze pseudo-queries per training collection
    max_queries: int  # per split, scoring (0: all)
    score_depth: int  # candidates reranked per query when scoring
    limits_s: dict[str, int]


# Limits from the 2026-11-26/27 H100 runs (speed 57 s, profile 39 s, tests 169 s, tenants 77 s, training 170 s
# with a 130 s budget); speed also measures the adapter merged and the full-attention baseline in CUDA graphs.
# All stages together outlast one call (10 minutes): pick with --stages.
GPU = Sizes("10,25,50,100,200,500", 160, 96, 10, "1,4,16", 48, 20, 8, 20000, 120.0, 4000, 0, SERVED_DEPTH,
            {"serve": 240, "speed": 110, "train": 200, "score": 120, "profile": 75, "tests": 240, "tenants": 100})
TINY = Sizes("2,4", 32, 32, 1, "1,2", 4, 3, 4, 3, 0.0, 4, 2, 4,
             {"serve": 600, "speed": 300, "train": 600, "score": 600, "tenants": 600, "tests": 60, "profile": 300})


def stage_commands(args: argparse.Namespace, sizes: Sizes) -> dict[str, list[str]]:
    py, out, data = sys.executable, args.out, str(args.data)
    device = "cuda" if not args.tiny else "auto"
    also = [str(args.data.parent / name) for name in carried_collections(args.assets)]
    retriever_var = out / SERVICES  # the serve stage's services' data; its retriever serves train's negatives
    serve_args = ["--data", data, "--var-dir", str(retriever_var), "--out", str(out / "capacity"),
                  "--device", device, *(a for d in also for a in ("--also-ingest", d))]
    train_args = ["--data", data, "--retriever-dir", str(retriever_var / "retriever"),
                  "--collection", args.data.name, *(a for d in also for a in ("--also", d)),
                  "--pseudo-queries", str(sizes.pseudo_queries), "--pseudo-source", "sentence",
                  "--negatives-mode", "dense", "--negatives-depth", "30",
                  "--out", str(out / "adapter"), "--device", device, "--n-docs", str(sizes.train_docs),
                  "--block-tokens", str(sizes.train_block_tokens), "--steps", str(sizes.train_steps),
                  "--dev-query-ids-from", str(SHIPPED_META), "--save-every", "1000000"]
    if sizes.train_budget_s:
        train_args += ["--budget-s", str(sizes.train_budget_s)]
    commands = {
        "serve": [py, "-m", "deploy.gpu_capacity", *serve_args, *(["--tiny"] if args.tiny else [])],
        "tests": [py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--tb=short", "--device", "cuda", *CUDA_TESTS],
        "speed": [py, "-m", "reranker.bench", "speed", "--n-docs", sizes.n_docs, "--block-tokens",
                  str(sizes.block_tokens), "--device", device, "--data", data, "--repeats", str(sizes.repeats),
                  "--out", str(out / "reranker_speed.json")],
        "profile": [py, "-m", "reranker.gpu", "profile", "--device", device, "--data", data,
                    "--n-docs", sizes.n_docs.split(",")[-1] if args.tiny else "100",
                    "--block-tokens", str(sizes.block_tokens), "--out", str(out / "profile.txt")],
        "tenants": [py, "-m", "reranker.bench", "tenants", "--tenants", sizes.tenants, "--device", device,
                    "--data", data, "--requests", str(sizes.requests), "--docs", str(sizes.tenant_docs),
                    "--repeats", str(max(1, sizes.repeats // 2)),
                    "--out", str(out / "reranker_tenants.json")],
        "train": [py, "-m", "reranker.training.train", *train_args],
        "score": [py, "-m", "reranker.gpu", "score", "--device", device, "--evidence", str(args.assets / "evidence"),
                  "--data-root", str(args.data.parent), "--adapter", f"gpu={out / 'adapter'}",
                  "--adapter", "shipped=default", "--depth", str(sizes.score_depth),
                  "--max-queries", str(sizes.max_queries), "--out", str(out / "evidence")],
    }
    if args.tiny:
        del commands["tests"]  # the CUDA tests run in the suite itself (skipped without CUDA)
    # Most wanted first (the limits' order): a call cut short still brings back what finished.
    return {name: commands[name] for name in sizes.limits_s if name in commands
            and (not args.stages or name in args.stages)}


def carried_collections(assets: Path) -> list[str]:
    """The collections carried besides the first (prepare's --also), which lie beside it."""
    manifest = assets / "manifest.json"
    return list(json.loads(manifest.read_text()).get("also", [])) if manifest.exists() else []


def run(args: argparse.Namespace) -> dict:
    sizes = TINY if args.tiny else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"env": environment(), "stages": {}}
    write_summary(args, summary)
    for name, command in stage_commands(args, sizes).items():
        summary["stages"][name] = run_stage(name, command, sizes.limits_s[name], args.out)
        write_summary(args, summary)
    return summary


def run_stage(name: str, command: list[str], limit_s: int, out: Path) -> dict:
    """One stage as a subprocess, its output teed to <out>/<name>.log, killed after `limit_s`; a failure
    does not stop the job."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        # Progress bars refresh every 30 s at most: the log stays readable (the reply shows only its tail).
        # Its own process group: a stage killed at its limit takes the servers it started along (the serve
        # stage's), which would otherwise hold the GPU through the next stages.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "TQDM_MININTERVAL": "30"}, start_new_session=True)
        watchdog = threading.Timer(limit_s, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            print(f"[{name}] {line.rsplit(chr(13), 1)[-1]}", end="", flush=True)  # last state of a progress bar
        code = proc.wait()
        watchdog.cancel()
    seconds = time.perf_counter() - start
    status = "ok" if code == 0 else f"killed after {limit_s}s" if seconds >= limit_s else f"exit {code}"
    print(f"== {name}: {status} in {seconds:.0f}s", flush=True)
    return {"status": status, "seconds": round(seconds, 1), "command": command}


def environment() -> dict:
    import transformers

    device = resolve_device("auto")
    return {"device": describe_device(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def write_summary(args: argparse.Namespace, summary: dict) -> None:
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(args.out, arcname="gpu", filter=archived)


def archived(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """What comes back: not training checkpoints, not the services' data (the logs do)."""
    skipped = "checkpoint-" in member.name or member.name.startswith((f"gpu/{SERVICES}/retriever",
                                                                      f"gpu/{SERVICES}/tenants"))
    return None if skipped else member


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", type=Path, default=Path(".gpu/assets"), help="what `prepare` wrote (its assets/)")
    p.add_argument("--data", type=Path, required=True, help="the BEIR directory unpacked from data.tar.gz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--archive", type=Path, default=None, help="a .tar.gz of --out, rewritten after every stage")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any device: the dry run")
    p.add_argument("--stages", nargs="*", default=[], help="only these stages")
