"""`make run`'s demo (services.run, deploy.demo) on a small BEIR collection: the quality table holds each stage's
nDCG@10 as an independent scoring of the gateway's own answers gives it, over the stated sample; the example is
the typical sampled query by the stated rule, its stages side by side with exactly the judged documents marked."""

from __future__ import annotations

import json
import math
import signal
import socket
from pathlib import Path

import pytest

from deploy import demo
from services import run
from services.client import search
from services.gen.retrieval.v1 import document_pb2
from services.run import RERANK_BY_DEFAULT
from tests.conftest import FIXTURE_DOCS

pytestmark = pytest.mark.integration

# Test queries with judgments that the stages get partly wrong (a second, off-topic judged document; a paraphrase
# the keyword index cannot match), so nDCG@10 differs between queries and stages.
QUERIES = {
    "q1": ("kittens purr", {"cats": 1, "football": 1}),
    "q2": ("lava and volcanic ash", {"volcano": 1}),
    "q3": ("a pet feline", {"cats": 1, "insulin": 1}),
    "q4": ("sugar in the blood and the pancreas", {"insulin": 1, "bread": 1}),
    "q5": ("emperors aqueducts", {"rome": 1, "quantum": 1, "stocks": 1}),
    "q6": ("equities sold in a panic", {"stocks": 1}),
}
SAMPLED = ["q1", "q3", "q5"]  # --rerank-sample 3 of 6: one in every 2 in file order, from the first
DEPTH = 8


def beir_dir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                               for i, t, x in FIXTURE_DOCS))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": text}) + "\n"
                                                for q, (text, _) in QUERIES.items()))
    rows = "".join(f"{q}\t{doc}\t{rel}\n" for q, (_, judged) in QUERIES.items() for doc, rel in judged.items())
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return root


def ndcg10(ranked: list[str], judged: dict[str, int]) -> float:
    """Textbook nDCG@10 (linear gain, log2 discount), written here independently of ir-measures."""
    dcg = sum(judged.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:10]))
    ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(sorted(judged.values(), reverse=True)[:10]))
    return dcg / ideal if ideal else 0.0


def independent_rankings(gateway: str, collection: str) -> dict[str, dict[str, list[str]]]:
    """Each stage's top 10 for each query, asked one at a time with the plain client."""
    modes = {"lexical": document_pb2.RETRIEVAL_MODE_LEXICAL, "dense": document_pb2.RETRIEVAL_MODE_DENSE,
             "hybrid": document_pb2.RETRIEVAL_MODE_HYBRID}
    rankings = {stage: {q: [h.document.id for h in search(gateway, collection, text, 10, mode=mode).results]
                        for q, (text, _) in QUERIES.items()} for stage, mode in modes.items()}
    reranked = {q: search(gateway, collection, QUERIES[q][0], 10, rerank_depth=DEPTH, mode=modes["hybrid"])
                for q in SAMPLED}
    assert all(reply.reranked for reply in reranked.values())
    return rankings | {"reranked": {q: [h.document.id for h in reply.results] for q, reply in reranked.items()}}


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    """stage -> its nDCG@10 cells, from the quality table (the block under the `stage` header)."""
    if not any(line.split()[:1] == ["stage"] for line in lines):
        return {}
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["stage"]) + 2
    rows = {}
    for line in lines[start:]:
        cells = line.split()
        if not cells or not all(c == "-" or c.replace(".", "", 1).isdigit() for c in cells[1:]):
            break
        rows[cells[0]] = cells[1:]
    return rows


def side_by_side_cells(lines: list[str]) -> dict[str, list[tuple[str, bool]]]:
    """stage -> [(document id, marked)] from the side-by-side block (fixed-width columns)."""
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["rank"])
    stages = lines[start].split()[1:]
    width = len(lines[start + 1].split()[1])
    columns: dict[str, list[tuple[str, bool]]] = {stage: [] for stage in stages}
    for line in lines[start + 2:]:
        if not line[:4].strip().isdigit():
            break
        for i, stage in enumerate(stages):
            cell = line[6 + i * (width + 2):6 + (i + 1) * (width + 2)]
            if cell.strip():
                columns[stage].append((cell[1:].split()[0], cell[0] == "*"))
    return columns


def test_quality_table_and_example_match_an_independent_scoring(server_factory, fixture_retriever, tmp_path):
    reranker = server_factory("services.reranker", ["--block-tokens", "64", *RERANK_BY_DEFAULT]).start()
    gateway = server_factory("services.gateway", ["--retriever-target", fixture_retriever.target,
                                                  "--reranker-target", reranker.target]).start()
    lines: list[str] = []
    example = demo.show_quality(gateway.target, "c", beir_dir(tmp_path / "beir"), DEPTH, sample_size=3,
                                out=lambda text: lines.extend(text.splitlines()))

    rankings = independent_rankings(gateway.target, "c")
    scores = {stage: {q: ndcg10(ranked, QUERIES[q][1]) for q, ranked in by_query.items()}
              for stage, by_query in rankings.items()}
    assert len({round(v, 6) for by_query in scores.values() for v in by_query.values()}) > 2, "a vacuous fixture"
    rows = table_rows(lines)
    assert list(rows) == ["lexical", "dense", "hybrid", "reranked"]
    for stage in ("lexical", "dense", "hybrid"):
        every = sum(scores[stage].values()) / len(QUERIES)
        sampled = sum(scores[stage][q] for q in SAMPLED) / len(SAMPLED)
        assert rows[stage] == [f"{every:.4f}", f"{sampled:.4f}"], stage
    assert rows["reranked"] == ["-", f"{sum(scores['reranked'].values()) / len(SAMPLED):.4f}"]
    assert any(line.startswith("sampled: 3 of 6 test queries: one in every 2 in the qrels file's order, starting "
                               "with the first;") for line in lines)

    differences = [scores["reranked"][q] - scores["hybrid"][q] for q in SAMPLED]
    change = sum(differences) / len(SAMPLED)
    half_width = 1.96 * math.sqrt(sum((d - change) ** 2 for d in differences) / (len(SAMPLED) - 1) / len(SAMPLED))
    assert any(line.startswith(f"reranked - hybrid on the same 3: {change:+.4f} ± {half_width:.4f} (95%, paired), "
                               f"{'within' if abs(change) <= half_width else 'beyond'} ") for line in lines)

    mean = sum(scores["reranked"].values()) / len(SAMPLED)
    distance = {q: abs(scores["reranked"][q] - mean) for q in SAMPLED}
    assert example == next(q for q in SAMPLED if distance[q] <= min(distance.values()) + 1e-9)  # first on a tie
    assert f"query {example}: {QUERIES[example][0]}" in lines
    columns = side_by_side_cells(lines)
    assert list(columns) == ["lexical", "dense", "hybrid", "reranked"]
    for stage, cells in columns.items():
        assert [doc for doc, _ in cells] == rankings[stage][example], stage
        assert {doc for doc, marked in cells if marked} == set(QUERIES[example][1]) & set(rankings[stage][example])


def free_base_port() -> int:
    """A port whose next two are free as well (services.run takes base, base+1, base+2)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 2 < 65536 and all(_free(base + i) for i in (1, 2)):
            return base
    raise RuntimeError("no three consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_make_run_without_reranker_and_with_own_query(tmp_path, capsys):
    data = beir_dir(tmp_path / "beir")
    common = ["--data", str(data), "--collection", "fixture", "--var-dir", str(tmp_path / "var"), "--no-reranker",
              "--exit-after-query"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert run.main([*common, "--base-port", str(free_base_port())]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert list(table_rows(lines)) == ["lexical", "dense", "hybrid"]
        assert not any(line.startswith("sampled:") for line in lines)
        example = next(line.split()[1].rstrip(":") for line in lines if line.startswith("query q"))
        columns = side_by_side_cells(lines)
        assert list(columns) == ["lexical", "dense", "hybrid"]
        for cells in columns.values():
            assert {doc for doc, marked in cells if marked} == set(QUERIES[example][1]) & {doc for doc, _ in cells}

        assert run.main([*common, "--base-port", str(free_base_port()), "--query", "volcanic ash"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "collection fixture already holds 8 documents" in lines and "query: volcanic ash" in lines
        columns = side_by_side_cells(lines)
        assert list(columns) == ["lexical", "dense", "hybrid"]
        assert columns["lexical"][0] == ("volcano", False) and not any(m for c in columns.values() for _, m in c)
        assert not table_rows(lines)
    finally:
        signal.signal(signal.SIGTERM, before)
