"""The BM25 index (retriever.lexical) on its own: upsert, delete, persistence, queries with odd text."""

from common.types import Document
from retriever.lexical import LexicalIndex, query_terms

DOCS = [Document("cats", "Domestic cats", "Kittens purr and chase mice."),
        Document("bread", "Baking bread", "Yeast ferments the dough before baking."),
        Document("rome", "Ancient Rome", "Emperors built roads and aqueducts.")]


def test_upsert_replace_delete_and_reopen(tmp_path):
    index = LexicalIndex(tmp_path / "lex")
    assert index.applied is None and len(index) == 0
    assert index.applied is None
    index.apply([(DOCS, [])], seq=1)
    assert index.applied == 1 and len(index) == 3
    assert index.search("purring kitten", 3)[0][0] == "cats", "stemmed: purring ~ purr, kitten ~ kittens"
    index.apply([([Document("cats", "Sourdough", "A starter leavens rye bread.")], [])], seq=2)
    assert len(index) == 3, "an upsert replaces by id"
    assert [i for i, _ in index.search("kittens", 3)] == []
    assert index.search("rye sourdough", 1)[0][0] == "cats"
    index.apply([([], ["rome", "missing"])], seq=3)
    assert len(index) == 2 and index.search("aqueducts", 3) == []
    index.close()

    reopened = LexicalIndex(tmp_path / "lex")
    assert reopened.applied == 3 and len(reopened) == 2
    assert reopened.search("yeast dough", 1)[0][0] == "bread"


def test_scores_are_bm25_ordered_and_queries_need_no_syntax(tmp_path):
    index = LexicalIndex(tmp_path / "lex")
    index.apply([(DOCS, [])], seq=1)
    hits = index.search("bread baking yeast", 3)
    assert hits[0][0] == "bread" and all(a[1] >= b[1] > 0 for a, b in zip(hits, hits[1:], strict=False))
    for odd in ['"unbalanced', "a:b -c (d", "AND OR NOT", "5'-nucleotidase", "***", "emperors)"]:
        index.search(odd, 3)  # never a parse error
    assert index.search("emperors)", 1)[0][0] == "rome"
    assert index.search("!!! ???", 3) == [], "no token, no hit"
    assert query_terms("Cats cats CATS running") == ["cat", "run"]


def test_rebuild_replaces_everything(tmp_path):
    index = LexicalIndex(tmp_path / "lex")
    index.apply([(DOCS, [])], seq=1)
    assert index.rebuild(DOCS[:1], seq=7) == 1
    assert index.applied == 7 and len(index) == 1
    assert index.search("roads", 3) == []


def test_writes_applied_in_order_within_one_commit(tmp_path):
    """A group of writes committed together: a later write's delete removes an earlier write's add, and a
    later add survives an earlier delete of the same id."""
    index = LexicalIndex(tmp_path / "lex")
    index.apply([(DOCS, []), ([], ["cats"]), ([Document("rome", "Modern Rome", "Scooters and espresso.")], []),
                 ([], ["bread"]), ([Document("bread", "Rye", "Dense loaves.")], [])], seq=5)
    assert len(index) == 2
    assert index.search("kittens", 3) == [] and index.search("aqueducts", 3) == []
    assert index.search("espresso", 1)[0][0] == "rome" and index.search("loaves", 1)[0][0] == "bread"
