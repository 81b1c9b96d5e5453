"""The storage backends a retriever can be configured with, and the one place that opens them. The backends
depend on `retriever.backend` (their protocols); this module depends on them, so nothing imports back."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from retriever.backend import Backend


class BackendKind(StrEnum):
    FAISS = "faiss"  # local: SQLite + FAISS + tantivy under a data directory (the default)
    MILVUS = "milvus"  # Milvus Lite (a .db file) or a Milvus standalone/cluster


def open_backend(kind: BackendKind, data_dir: Path, milvus_uri: str = "", milvus_token: str = "",
                 checkpoint_fraction: float | None = None) -> Backend:
    """The backend a service was configured with (Milvus's client is imported only when asked for)."""
    if kind is BackendKind.MILVUS:
        if not milvus_uri:
            raise ValueError("the milvus backend needs a URI: a Milvus Lite file (*.db) or http://host:19530")
        from retriever.milvus import MilvusBackend

        return MilvusBackend(milvus_uri, milvus_token)
    from retriever.collection import CheckpointPolicy, LocalBackend

    policy = CheckpointPolicy() if checkpoint_fraction is None else CheckpointPolicy(fraction=checkpoint_fraction)
    return LocalBackend(data_dir, policy)
