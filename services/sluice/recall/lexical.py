"""Lexical match: BM25 inverted indexes (bm25s, sparse matrices) over item text.

The main index scores the item document (the title counted twice plus the
description); a second index over titles alone gives the coarse ranker a
field-level signal (a match in the title says more than one in a long
description). Tokens are lower-cased words, English-stemmed unless an index
is built with ``stem=False`` (plain BM25, the usual reference setting).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
from scipy import sparse

from sluice.data.tokens import tokenize

TITLE_DIR = "title"


def document_text(
    title: str, description: str = "", title_weight: int = 2, stem: bool = True
) -> list[str]:
    """Tokens of an item document: the title counted ``title_weight`` times plus the description."""
    return tokenize(title, stem) * title_weight + (
        tokenize(description, stem) if description else []
    )


def _bm25(corpus: list[list[str]], k1: float, b: float) -> bm25s.BM25:
    bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
    bm25.index(corpus, show_progress=False)
    return bm25


def _scores(bm25: bm25s.BM25, tokens: list[str], size: int) -> np.ndarray:
    vocab: dict[str, int] = bm25.vocab_dict
    known = [t for t in tokens if t in vocab]
    if not known:
        return np.zeros(size, dtype=np.float32)
    return np.asarray(bm25.get_scores(known), dtype=np.float32)


class LexicalIndex:
    """BM25 over item documents (and over titles alone); rows are catalog rows."""

    def __init__(
        self,
        bm25: bm25s.BM25,
        size: int,
        stem: bool = True,
        title_bm25: bm25s.BM25 | None = None,
    ) -> None:
        self._bm25 = bm25
        self._vocab: dict[str, int] = bm25.vocab_dict
        self._title = title_bm25
        self.size = size
        self.stem = stem

    @classmethod
    def build(
        cls,
        titles: Sequence[str],
        descriptions: Sequence[str] | None = None,
        k1: float = 1.2,
        b: float = 0.75,
        stem: bool = True,
        title_index: bool = True,
    ) -> LexicalIndex:
        descs = descriptions or [""] * len(titles)
        corpus = [document_text(t, d, stem=stem) for t, d in zip(titles, descs, strict=True)]
        title_bm25 = None
        if title_index:
            title_bm25 = _bm25([tokenize(t, stem) or ["\x00"] for t in titles], k1, b)
        return cls(_bm25(corpus, k1, b), len(titles), stem, title_bm25)

    def slice_rows(self, start: int, stop: int) -> LexicalIndex:
        """The index of rows ``start`` to ``stop`` only (a recall shard's): each row keeps the
        score it has in the whole index, term statistics included, so a query scores every
        row as the whole index does. Without the title index (the coarse stage's)."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"rows {start}:{stop} are not within 0:{self.size}")
        sc = self._bm25.scores
        terms = len(sc["indptr"]) - 1
        matrix = sparse.csr_matrix(
            (sc["data"], sc["indices"], sc["indptr"]), shape=(terms, int(sc["num_docs"]))
        )[:, start:stop]
        part = copy.copy(self._bm25)
        part.scores = {
            "data": matrix.data.astype(sc["data"].dtype, copy=False),
            "indices": matrix.indices.astype(sc["indices"].dtype, copy=False),
            "indptr": matrix.indptr.astype(sc["indptr"].dtype, copy=False),
            "num_docs": stop - start,
        }
        return LexicalIndex(part, stop - start, self.stem, None)

    def tokens(self, query: str) -> list[str]:
        return tokenize(query, self.stem)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for the query (0 where no term matches)."""
        return _scores(self._bm25, self.tokens(query), self.size)

    def title_scores(self, query: str) -> np.ndarray:
        """BM25 of the query against titles alone (the document scores without a title index)."""
        if self._title is None:
            return self.scores(query)
        return _scores(self._title, self.tokens(query), self.size)

    def search(
        self, query: str, k: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows with a positive score among the rows ``mask`` allows, best first;
        equal scores in row order (also at the cut, so a slice of the rows agrees)."""
        s = self.scores(query)
        if mask is not None:
            s = np.where(mask, s, 0.0)
        hits = np.flatnonzero(s > 0)
        if len(hits) > k:
            kth = s[hits[np.argpartition(-s[hits], k - 1)[k - 1]]]
            above, tied = hits[s[hits] > kth], hits[s[hits] == kth]  # hits is in row order
            hits = np.concatenate([above, tied[: k - len(above)]])
        order = hits[np.lexsort((hits, -s[hits]))]
        return order.astype(np.int64), s[order]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(directory), show_progress=False)
        if self._title is not None:
            self._title.save(str(directory / TITLE_DIR), show_progress=False)
        meta = {"size": self.size, "stem": self.stem, "title_index": self._title is not None}
        (directory / "size.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        bm25 = bm25s.BM25.load(str(directory), show_progress=False)
        meta = json.loads((directory / "size.json").read_text())
        title = None
        if meta.get("title_index") and (directory / TITLE_DIR).exists():
            title = bm25s.BM25.load(str(directory / TITLE_DIR), show_progress=False)
        return cls(bm25, int(meta["size"]), bool(meta.get("stem", True)), title)
