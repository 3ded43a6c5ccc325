"""Lexical match: a BM25 inverted index (bm25s, sparse matrices) over item text."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

_TOKEN = re.compile(r"(?u)\b\w+\b")
_stemmer = Stemmer.Stemmer("english")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens, English-stemmed (shared by indexing and queries)."""
    words = _TOKEN.findall(text.lower())
    return [str(w) for w in _stemmer.stemWords(words)]


def document_text(title: str, description: str = "", title_weight: int = 2) -> list[str]:
    """Tokens of an item document: the title counted ``title_weight`` times plus the description."""
    return tokenize(title) * title_weight + (tokenize(description) if description else [])


class LexicalIndex:
    """BM25 over item documents; rows are catalog rows."""

    def __init__(self, bm25: bm25s.BM25, size: int) -> None:
        self._bm25 = bm25
        self._vocab: dict[str, int] = bm25.vocab_dict
        self.size = size

    @classmethod
    def build(
        cls,
        titles: Sequence[str],
        descriptions: Sequence[str] | None = None,
        k1: float = 1.2,
        b: float = 0.75,
    ) -> LexicalIndex:
        descs = descriptions or [""] * len(titles)
        corpus = [document_text(t, d) for t, d in zip(titles, descs, strict=True)]
        bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        bm25.index(corpus, show_progress=False)
        return cls(bm25, len(titles))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for the query (0 where no term matches)."""
        tokens = [t for t in tokenize(query) if t in self._vocab]
        if not tokens:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float32)

    def search(
        self, query: str, k: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows with a positive score among the rows ``mask`` allows."""
        s = self.scores(query)
        if mask is not None:
            s = np.where(mask, s, 0.0)
        hits = np.flatnonzero(s > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-s[hits], k - 1)[:k]]
        order = hits[np.argsort(-s[hits], kind="stable")]
        return order.astype(np.int64), s[order]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(directory), show_progress=False)
        (directory / "size.json").write_text(json.dumps({"size": self.size}))

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        bm25 = bm25s.BM25.load(str(directory), show_progress=False)
        size = json.loads((directory / "size.json").read_text())["size"]
        return cls(bm25, size)
