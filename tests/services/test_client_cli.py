"""The CLI client, run as a user would, against real servers."""

import json
import subprocess
import sys

import pytest

from tests.conftest import FIXTURE_DOCS, ROOT

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.client", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ingest_search_health(server_factory, tmp_path):
    corpus = tmp_path / "beir"
    corpus.mkdir()
    # Some public BEIR corpora hold documents with neither title nor text: the ingest reports them, never aborts.
    rows = [{"_id": i, "title": t, "text": x} for i, t, x in FIXTURE_DOCS] + [{"_id": "blank", "title": "", "text": ""}]
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    retriever = server_factory("services.retriever", ["--data-dir", str(tmp_path / "data")]).start()
    gateway = server_factory("services.gateway", ["--retriever-target", retriever.target]).start()

    ingested = cli("--json", "ingest", "--target", retriever.target, "--collection", "mini", "--corpus", str(corpus))
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout) == {"collection": "mini", "upserted": len(FIXTURE_DOCS),
                                           "skipped_empty": ["blank"]}

    listed = cli("collections", "--target", retriever.target)
    assert "mini: 8 docs" in listed.stdout

    found = cli("--json", "search", "--target", gateway.target, "--collection", "mini", "--query",
                "emperors of Rome", "--top-k", "2")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["results"][0]["document"]["id"] == "rome"
    readable = cli("search", "--target", gateway.target, "--collection", "mini", "--query", "emperors of Rome")
    assert "[rome]" in readable.stdout.splitlines()[2]

    health = cli("--json", "health", "--target", gateway.target)
    assert json.loads(health.stdout)["status"] == "SERVING"
    missing = cli("search", "--target", gateway.target, "--collection", "nope", "--query", "q")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
