"""Readers for collections in the BEIR layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from common.types import Document


def iter_corpus(data_dir: Path | str) -> Iterator[Document]:
    with open(Path(data_dir) / "corpus.jsonl", encoding="utf-8") as rows:
        for line in rows:
            if line.strip():
                row = json.loads(line)
                metadata = {k: str(v) for k, v in (row.get("metadata") or {}).items()}
                yield Document(id=str(row["_id"]), title=row.get("title") or "", text=row.get("text") or "",
                               metadata=metadata)


def count_corpus(data_dir: Path | str, indexable_only: bool = False) -> int:
    """Documents in corpus.jsonl; `indexable_only`: those with a title or a text (a collection stores only
    those)."""
    if indexable_only:
        return sum(1 for doc in iter_corpus(data_dir) if doc.embedding_text())
    with open(Path(data_dir) / "corpus.jsonl", encoding="utf-8") as rows:
        return sum(1 for line in rows if line.strip())


def load_queries(data_dir: Path | str) -> dict[str, str]:
    queries: dict[str, str] = {}
    with open(Path(data_dir) / "queries.jsonl", encoding="utf-8") as rows:
        for line in rows:
            if line.strip():
                row = json.loads(line)
                queries[str(row["_id"])] = row["text"]
    return queries


def load_qrels(data_dir: Path | str, split: str = "test") -> dict[str, dict[str, int]]:
    """query id -> {doc id: relevance}; the header line is skipped."""
    qrels: dict[str, dict[str, int]] = {}
    with open(Path(data_dir) / "qrels" / f"{split}.tsv", encoding="utf-8") as rows:
        reader = csv.reader(rows, delimiter="\t")
        next(reader, None)
        for row in reader:
            if len(row) >= 3:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def split_queries(data_dir: Path | str, split: str = "test") -> dict[str, str]:
    """The queries judged in a split (BEIR evaluates only those)."""
    queries = load_queries(data_dir)
    return {qid: queries[qid] for qid in load_qrels(data_dir, split) if qid in queries}
