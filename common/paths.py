"""Where things are in a checkout: the repository root and the bundled BEIR collections beside it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # BEIR-layout collections (SciFact, NFCorpus)
SCIFACT = SHARED_DATA / "scifact"
VAR_DIR = REPO_ROOT / "var"  # what `make run` writes: the retriever's data, logs
