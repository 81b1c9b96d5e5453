"""BlockRank prompt layout: prefix | N document blocks | final segment.

    prefix : instruction, the query, a "Documents:" header
    doc i  : "[i] title: text" truncated to `block_tokens` tokens; "[i]" is the
             identifier tag (the LM target when training), the rest is scored
    final  : the query again, then the answer prefix ending in "[": its last
             `signal_tokens` tokens are the ones whose attention scores documents
Token ids are built per segment (never by re-tokenising a joined string), so
segment boundaries are exact.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from transformers import PreTrainedTokenizerBase

DEFAULT_BLOCK_TOKENS = 160  # H, the paper's block length; adapters record the one they were trained with


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str = ("Rank the documents by how relevant they are to the query. "
                        "Each document starts with its identifier in brackets.")
    prefix: str = "{instruction}\nQuery: {query}\nDocuments:\n"
    tag: str = "[{index}]"  # the document's identifier; excluded from its relevance score
    document: str = " {title}: {text}\n"
    final: str = "\nQuery: {query}\nThe identifier of the most relevant document is"
    answer_open: str = " ["  # the last signal token; the one before it is the second


@dataclass(frozen=True)
class PromptLimits:
    block_tokens: int = DEFAULT_BLOCK_TOKENS  # H: every document block is cut to this many tokens
    max_query_tokens: int = 128
    signal_tokens: int = 2


@dataclass
class Prompt:
    """One request's token ids, segment by segment."""

    prefix: list[int]
    docs: list[list[int]]  # identifier tag + content, at most block_tokens each
    final: list[int]
    signal_tokens: int
    tag_lengths: list[int]  # leading tokens of each doc that are its identifier
    # Leading prefix tokens that are the same for every query (BOS + instruction): their K/V are
    # computed once per model chain and reused (see routing.SharedPrefixCache).
    shared_prefix: int = 0

    @property
    def n_docs(self) -> int:
        return len(self.docs)

    @cached_property
    def doc_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every document's ids back to back and each one's length (int64 arrays): what the forward lays out
        (reranker.docbatch). Built once, when the prompt is built (off the model's critical path: a list of 16K
        ints takes ~0.3 ms to read, a tenth of a 100-document rerank on a GPU); the documents must not change
        afterwards."""
        lengths = np.fromiter((len(doc) for doc in self.docs), dtype=np.int64, count=len(self.docs))
        flat = np.fromiter(itertools.chain.from_iterable(self.docs), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate = PromptTemplate(),
                 limits: PromptLimits = PromptLimits()) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.limits = limits
        self._bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        # The prefix is tokenised as [instruction head | query tail], split before the query's
        # leading space: for BPE tokenizers that is where a word boundary is anyway, so the ids equal
        # those of the joined string (tests/reranker/test_zoo.py checks it).
        head, tail = template.prefix.split("{query}", 1)
        stripped = head.rstrip(" ")
        self._shared = self._bos + self._ids(stripped.format(instruction=template.instruction))
        self._query_part = head[len(stripped):] + "{query}" + tail

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def query_ids_text(self, query: str) -> str:
        ids = self._ids(query)[: self.limits.max_query_tokens]
        return str(self.tokenizer.decode(ids))

    def build(self, query: str, docs: list[tuple[str, str]]) -> Prompt:
        """docs: (title, text) pairs in slot order; slot i gets identifier i."""
        query = self.query_ids_text(query)
        t = self.template
        prefix = self._shared + self._ids(self._query_part.format(query=query))
        tags = [self._ids(t.tag.format(index=i)) for i in range(len(docs))]
        blocks = [(tag + self._ids(t.document.format(title=title, text=text)))[: self.limits.block_tokens]
                  for tag, (title, text) in zip(tags, docs, strict=True)]
        final = self._ids(t.final.format(query=query)) + self._ids(t.answer_open)
        prompt = Prompt(prefix=prefix, docs=blocks, final=final, signal_tokens=self.limits.signal_tokens,
                        tag_lengths=[len(tag) for tag in tags], shared_prefix=len(self._shared))
        prompt.doc_tokens  # noqa: B018 - laid out now, in the request's thread
        return prompt

    def answer_ids(self, index: int) -> list[int]:
        """Token ids of the completion naming document `index` (the LM target when training)."""
        return self._ids(f"{index}]")


class PromptBuilders:
    """One PromptBuilder per block length (tenants may differ), made on first use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_query_tokens: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_query_tokens = max_query_tokens
        self._builders: dict[int, PromptBuilder] = {}
        self._lock = threading.Lock()

    def get(self, block_tokens: int) -> PromptBuilder:
        with self._lock:
            builder = self._builders.get(block_tokens)
            if builder is None:
                limits = PromptLimits(block_tokens=block_tokens, max_query_tokens=self.max_query_tokens)
                builder = self._builders[block_tokens] = PromptBuilder(self.tokenizer, PromptTemplate(), limits)
            return builder


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("x")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id
