"""Training lists: which examples a first stage's candidates give, and the order steps take them in."""

import random

from common.types import Document
from reranker.training.candidates import Candidates
from reranker.training.train import Example, ExampleStream, build_examples, pseudo_pair


def doc(i: int) -> Document:
    return Document(id=f"d{i}", title=f"title {i}", text=f"text {i}")


def test_examples_are_per_relevant_document_or_per_query():
    candidates = [Candidates("q1", "query one", [doc(i) for i in range(6)], [1.0] * 6),
                  Candidates("q2", "query two", [doc(i) for i in range(3)], [1.0] * 3),  # too few negatives
                  Candidates("q3", "query three", [doc(i) for i in range(10, 16)], [1.0] * 6)]  # none relevant
    qrels = {"q1": {"d0": 1, "d4": 1}, "q2": {"d0": 1}, "q3": {"d99": 1}}
    pairs = build_examples(candidates, qrels, n_docs=4)
    assert [[p.id for p in e.positives] for e in pairs] == [["d0"], ["d4"]]
    assert all(d.id not in {"d0", "d4"} for e in pairs for d in e.negatives), "judged documents are never negatives"
    (per_query,) = build_examples(candidates, qrels, n_docs=4, per_query=True)
    assert [p.id for p in per_query.positives] == ["d0", "d4"]

    rng, positives_drawn = random.Random(0), set()
    for _ in range(20):
        docs, slot = per_query.draw(4, rng)
        assert len(docs) == 4 and sum(title in {"title 0", "title 4"} for title, _ in docs) == 1
        positives_drawn.add(docs[slot][0])
    assert positives_drawn == {"title 0", "title 4"}, "each use draws one of the query's relevant documents"


def test_stream_takes_collections_in_turn_and_covers_each_epoch():
    a = [Example(f"a{i}", [doc(i)], []) for i in range(2)]
    b = [Example(f"b{i}", [doc(i)], []) for i in range(3)]
    stream = ExampleStream([a, b, []], random.Random(0))
    taken = [stream.next().query for _ in range(12)]
    assert [q[0] for q in taken] == ["a", "b"] * 6, "an empty collection takes no turns"
    from_a, from_b = taken[0::2], taken[1::2]
    assert sorted(from_a[:2]) == sorted(from_a[2:4]) == ["a0", "a1"], "every epoch sees every example"
    assert sorted(from_b[:3]) == sorted(from_b[3:]) == ["b0", "b1", "b2"]


def test_one_collection_keeps_the_original_order():
    """With one collection the stream is the loop it replaced: in order, reshuffled at each new epoch."""
    examples = [Example(f"q{i}", [doc(i)], []) for i in range(5)]
    expected, rng = list(examples), random.Random(7)
    order = []
    for step in range(12):
        if step and step % len(expected) == 0:
            rng.shuffle(expected)
        order.append(expected[step % len(expected)].query)
    stream = ExampleStream([list(examples)], random.Random(7))
    assert [stream.next().query for _ in range(12)] == order


def test_pseudo_queries_from_titles_or_cut_sentences():
    text = ("Background sentence about the field and its open problem. We measured the effect in two cohorts of "
            "patients. The treatment reduced mortality by a third in both cohorts. Tiny.")
    source = Document(id="d1", title="A trial", text=text, metadata={"year": "2020"})
    assert pseudo_pair(source, "title", random.Random(0)) == ("A trial", source)
    assert pseudo_pair(Document(id="d2", text=text), "title", random.Random(0)) is None

    cut = set()
    for seed in range(20):
        pair = pseudo_pair(source, "sentence", random.Random(seed))
        assert pair is not None
        query, positive = pair
        assert query not in positive.text, "the sentence is cut out of its document: no verbatim match"
        assert query in text and positive.text.count(". ") == 2, "exactly one sentence goes"
        assert (positive.id, positive.title, positive.metadata) == ("d1", "A trial", {"year": "2020"})
        cut.add(query)
    assert "Tiny." not in cut and len(cut) == 3, "any sentence of a claim's length may be drawn, nothing shorter"
    assert pseudo_pair(Document(id="d3", text="One sentence only. And a second one here."), "sentence",
                       random.Random(0)) is None, "too short to lose a sentence"
