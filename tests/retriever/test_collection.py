"""Snapshot atomicity (retriever.collection): a crash at any step of a write leaves the old collection
or the new one on disk, never a mix, and the next write after a restart works."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import retriever.collection as collection_module
from common.types import Document
from retriever.collection import Collection
from retriever.index import StringIdIndex
from retriever.types import CollectionSpec, IndexKind

DIM = 8


class Crash(Exception):
    """Stands for the process dying at this point: nothing after it runs."""


def vectors(ids: list[str]) -> np.ndarray:
    """Each id's own unit vector (seeded by the id), whatever list it comes in."""
    v = np.stack([np.random.default_rng(int(i[1:])).normal(size=DIM) for i in ids]).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def docs(ids: list[str], text: str) -> list[Document]:
    return [Document(id=i, text=f"{text} token{i}") for i in ids]


def state(collection: Collection) -> dict[str, str]:
    """id -> text, after checking that every document is in both indexes: found by its own vector, and by
    its own words in the lexical index (each text names its id)."""
    ids = sorted(collection.documents)
    assert len(collection.index) == len(ids) == len(collection.lexical)
    if ids:
        top = collection.search_dense(vectors(ids), 1)
        assert [row[0][0] for row in top] == ids
        for doc_id in ids:
            text = collection.documents[doc_id].text
            assert collection.search_lexical(text, 1)[0][0] == doc_id, text
    return {i: collection.documents[i].text for i in ids}


def crash_on(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    real_replace = os.replace
    real_rmtree = shutil.rmtree
    calls = {"replace": 0}

    def replace(src, dst):  # noqa: ANN001, ANN202 - os.replace's own signature
        calls["replace"] += 1
        if (step == "snapshot rename" and calls["replace"] == 1) or (step == "CURRENT swap" and calls["replace"] == 2):
            raise Crash(step)
        return real_replace(src, dst)

    def rmtree(path, ignore_errors=False):  # noqa: ANN001, ANN202
        if step == "old snapshot cleanup" and Path(path).exists() and not str(path).endswith(".tmp"):
            raise Crash(step)
        return real_rmtree(path, ignore_errors=ignore_errors)

    real_fsync_dir = collection_module.fsync_dir

    def fsync_dir(path: Path) -> None:
        if path.name == "c":  # the collection directory, right after CURRENT was swapped
            raise Crash(step)
        real_fsync_dir(path)

    def fail(*_args: object) -> None:
        raise Crash(step)

    if step == "index file":
        monkeypatch.setattr(StringIdIndex, "write", fail)
    elif step == "directory fsync":
        monkeypatch.setattr(collection_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(collection_module.os, "replace", replace)
    monkeypatch.setattr(collection_module.shutil, "rmtree", rmtree)


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.HNSW])
@pytest.mark.parametrize("step", ["index file", "snapshot rename", "CURRENT swap", "directory fsync",
                                  "old snapshot cleanup"])
def test_a_crash_at_any_step_leaves_old_or_new_never_torn(tmp_path: Path, monkeypatch, step: str, kind: IndexKind):
    directory = tmp_path / "c"
    collection = Collection.create(CollectionSpec("c", DIM, kind), directory)
    first = [f"d{i}" for i in range(20)]
    collection.upsert(docs(first, "old"), vectors(first))
    old = state(collection)

    changed = [f"d{i}" for i in range(10, 30)]  # ten replaced, ten new
    crash_on(monkeypatch, step)
    with pytest.raises(Crash):
        collection.upsert(docs(changed, "new"), vectors(changed))
    monkeypatch.undo()
    collection.close()  # the process is gone: its index writer lock goes with it

    new = old | {i: f"new token{i}" for i in changed}
    recovered = Collection.load(directory)
    assert state(recovered) in (old, new), f"torn collection after a crash at {step}"
    assert state(recovered) == (old if step in ("index file", "snapshot rename", "CURRENT swap") else new)

    later = ["d99"]
    recovered.upsert(docs(later, "later"), vectors(later))
    expected = state(recovered)
    recovered.close()
    assert state(Collection.load(directory)) == expected, "the next write after the restart persists"
    assert len(list(directory.glob("snap-*"))) == 1, "leftovers of the crashed write are cleaned up"


def test_a_crash_between_the_dense_and_the_lexical_write_is_repaired_on_load(tmp_path: Path, monkeypatch):
    directory = tmp_path / "c"
    collection = Collection.create(CollectionSpec("c", DIM), directory)
    first = [f"d{i}" for i in range(10)]
    collection.upsert(docs(first, "old"), vectors(first))

    def crash(*_args: object) -> None:
        raise Crash("between the writes")

    monkeypatch.setattr(collection.lexical, "apply", crash)
    with pytest.raises(Crash):
        collection.upsert(docs(["d3", "d42"], "new"), vectors(["d3", "d42"]))
    monkeypatch.undo()
    collection.close()
    assert collection.lexical.applied == 2, "the dense snapshot (3) is ahead of the lexical index (2)"

    recovered = Collection.load(directory)
    assert recovered.lexical.applied == 3
    assert state(recovered)["d42"] == "new tokend42" and state(recovered)["d3"] == "new tokend3"
    assert recovered.search_lexical("old tokend3", 1)[0][0] == "d3" and recovered.search_lexical("tokend42", 1)
