"""The contract: buf lint (STANDARD) is clean and the generated code matches it."""

import shutil
import subprocess
import sys
from pathlib import Path

from services.gen.retrieval.v1 import adapter_pb2, reranker_pb2, retriever_pb2, search_pb2

ROOT = Path(__file__).resolve().parent.parent


def _buf() -> str:
    local = Path(sys.executable).parent / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    assert found, "buf is installed by make setup (buf-bin)"
    return found


def test_buf_lint_is_clean():
    result = subprocess.run([_buf(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_contract_names_are_stable():
    services = {
        "RetrieverService": (retriever_pb2, {"CreateCollection", "DeleteCollection", "ListCollections",
                                             "UpsertDocuments", "DeleteDocuments", "Retrieve"}),
        "RerankerService": (reranker_pb2, {"Rerank"}),
        "SearchService": (search_pb2, {"Search"}),
        "AdapterService": (adapter_pb2, {"LoadAdapter", "UnloadAdapter", "ListAdapters"}),
    }
    for name, (module, methods) in services.items():
        service = module.DESCRIPTOR.services_by_name[name]
        assert service.full_name == f"retrieval.v1.{name}"
        assert methods <= {m.name for m in service.methods}
    hit = search_pb2.SearchHit.DESCRIPTOR.fields_by_name
    assert {"document", "retrieval_score", "rerank_score"} <= set(hit)
    ranked = reranker_pb2.RankedDocument.DESCRIPTOR.fields_by_name
    assert {"index", "id", "score"} <= set(ranked)
    assert retriever_pb2.IndexType.Name(0) == "INDEX_TYPE_UNSPECIFIED"
