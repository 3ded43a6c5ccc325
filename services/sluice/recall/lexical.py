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
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import bm25s
import numpy as np
from scipy import sparse

from sluice.data.tokens import tokenize
from sluice.kernels import Postings, postings_at, postings_top

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


class LiveDocuments:
    """BM25 over the documents of items added after the build (live catalog updates), scored
    with the build index's statistics: a term's document frequency counts the build's
    documents and these, and lengths are normalised by the build's average, so that a live
    item's score compares with the build's items' in one list.

    Postings are replaced whole (never changed in place), so a search reads one consistent
    list per term while :meth:`add` runs on the updates thread."""

    def __init__(self, bm25: bm25s.BM25, average_length: float) -> None:
        self._bm25 = bm25
        self._vocab: dict[str, int] = bm25.vocab_dict
        self._indptr = np.asarray(bm25.scores["indptr"])
        self._docs = int(bm25.scores["num_docs"])
        self._average = max(average_length, 1e-9)
        self._postings: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._rows: set[int] = set()

    def add(self, rows: Sequence[int], documents: Sequence[list[str]]) -> None:
        """Index ``documents`` (token lists) as ``rows``; a row indexed before is replaced."""
        postings = dict(self._postings)
        again = {int(r) for r in rows} & self._rows
        if again:
            drop = np.fromiter(again, np.int64)
            for term, (at, tf, dl) in list(postings.items()):
                keep = ~np.isin(at, drop)
                postings[term] = (at[keep], tf[keep], dl[keep])
        for row, tokens in zip(rows, documents, strict=True):
            counts: dict[str, int] = {}
            for t in tokens:
                counts[t] = counts.get(t, 0) + 1
            for term, count in counts.items():
                at, tfs, dls = postings.get(term, (np.zeros(0, np.int64),) + (np.zeros(0),) * 2)
                postings[term] = (
                    np.append(at, int(row)),
                    np.append(tfs, float(count)),
                    np.append(dls, float(len(tokens))),
                )
            self._rows.add(int(row))
        self._postings = postings

    def __len__(self) -> int:
        return len(self._rows)

    def contributions(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each live document's BM25 score for ``tokens``, term by term: rows and float32
        scores to add in this order (a row appears once per query term it holds)."""
        postings, n = self._postings, self._docs + len(self._rows)
        k1, b = float(self._bm25.k1), float(self._bm25.b)
        rows, values = [], []
        for term in tokens:
            found = postings.get(term)
            if found is None:
                continue
            at, tf, dl = found
            t = self._vocab.get(term)
            df = len(at) + (int(self._indptr[t + 1] - self._indptr[t]) if t is not None else 0)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            rows.append(at)
            values.append(idf * tf / (k1 * ((1 - b) + b * dl / self._average) + tf))
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(rows), np.concatenate(values).astype(np.float32)


class LexicalIndex:
    """BM25 over item documents (and over titles alone); rows are catalog rows.

    ``capacity`` above ``size`` leaves room for items added after the build
    (:meth:`add_rows`): their rows come after the build's."""

    def __init__(
        self,
        bm25: bm25s.BM25,
        size: int,
        stem: bool = True,
        title_bm25: bm25s.BM25 | None = None,
        capacity: int | None = None,
        average_lengths: tuple[float, float] | None = None,
    ) -> None:
        self._bm25 = bm25
        self._vocab: dict[str, int] = bm25.vocab_dict
        self._title = title_bm25
        self.size = size
        self.capacity = max(capacity or size, size)
        self.stem = stem
        self._average_lengths = average_lengths  # documents, titles; None: not recorded
        self._live: tuple[LiveDocuments, LiveDocuments | None] | None = None

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
        titles_tokens = [len(tokenize(t, stem)) for t in titles] if title_index else [0]
        averages = (float(np.mean([len(d) for d in corpus] or [0])), float(np.mean(titles_tokens)))
        return cls(_bm25(corpus, k1, b), len(titles), stem, title_bm25, None, averages)

    def add_rows(
        self,
        rows: Sequence[int],
        titles: Sequence[str],
        descriptions: Sequence[str],
        build_texts: Callable[[], tuple[Sequence[str], Sequence[str]]],
    ) -> None:
        """Index items added after the build as ``rows`` (within the capacity).
        ``build_texts`` gives the build's titles and descriptions, read only when the build
        did not record its average lengths (builds before live updates)."""
        if any(not self.size <= r < self.capacity for r in rows):
            raise ValueError(f"live rows must be within {self.size}:{self.capacity}")
        if self._live is None:
            if self._average_lengths is None:
                ts, ds = build_texts()
                lengths = [
                    len(document_text(t, d, stem=self.stem)) for t, d in zip(ts, ds, strict=True)
                ]
                heads = [len(tokenize(t, self.stem)) for t in ts]
                self._average_lengths = (
                    float(np.mean(lengths or [0])),
                    float(np.mean(heads or [0])),
                )
            doc_avg, title_avg = self._average_lengths
            title = LiveDocuments(self._title, title_avg) if self._title is not None else None
            self._live = (LiveDocuments(self._bm25, doc_avg), title)
        documents, title = self._live
        documents.add(
            rows,
            [
                document_text(t, d, stem=self.stem)
                for t, d in zip(titles, descriptions, strict=True)
            ],
        )
        if title is not None:
            title.add(rows, [tokenize(t, self.stem) for t in titles])

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
        tokens = self.tokens(query)
        return self._with_live(_scores(self._bm25, tokens, self.size), tokens, 0)

    def title_scores(self, query: str) -> np.ndarray:
        """BM25 of the query against titles alone (the document scores without a title index)."""
        if self._title is None:
            return self.scores(query)
        tokens = self.tokens(query)
        return self._with_live(_scores(self._title, tokens, self.size), tokens, 1)

    def _with_live(self, scores: np.ndarray, tokens: list[str], which: int) -> np.ndarray:
        if self.capacity == self.size:
            return scores
        out = np.zeros(self.capacity, dtype=np.float32)
        out[: self.size] = scores
        rows, values = self._live_scores(tokens, which)
        np.add.at(out, rows, values)
        return out

    def _live_scores(self, tokens: list[str], which: int) -> tuple[np.ndarray, np.ndarray]:
        live = self._live[which] if self._live is not None else None
        if live is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return live.contributions(tokens)

    def _postings_of(
        self, query: str, title: bool
    ) -> tuple[Postings, list[int], tuple[np.ndarray, np.ndarray]]:
        """The index's postings, the query's term ids in it and the live documents' scores."""
        bm25, which = (self._title, 1) if title and self._title is not None else (self._bm25, 0)
        tokens = self.tokens(query)
        vocab: dict[str, int] = bm25.vocab_dict
        sc = bm25.scores
        postings = (sc["indptr"], sc["indices"], sc["data"])
        return postings, [vocab[t] for t in tokens if t in vocab], self._live_scores(tokens, which)

    def scores_at(
        self, query: str, rows: np.ndarray, title: bool = False
    ) -> tuple[np.ndarray, float]:
        """``scores(query)[rows]`` (``title_scores`` with ``title``) and the best score of any
        row (0 when none is positive), the same to the bit, from the query terms' postings
        alone (:func:`sluice.kernels.postings_at`), not an array of every row's score."""
        postings, terms, live = self._postings_of(query, title)
        return postings_at(postings, terms, rows, self.capacity, live)

    def search(
        self, query: str, k: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows with a positive score among the rows ``mask`` allows, best first;
        equal scores in row order (also at the cut, so a slice of the rows agrees). Only the
        rows the query terms' postings reach are visited (:func:`sluice.kernels.postings_top`)."""
        postings, terms, live = self._postings_of(query, False)
        return postings_top(postings, terms, k, self.capacity, mask, live)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(directory), show_progress=False)
        if self._title is not None:
            self._title.save(str(directory / TITLE_DIR), show_progress=False)
        meta = {
            "size": self.size,
            "stem": self.stem,
            "title_index": self._title is not None,
            "average_lengths": self._average_lengths,
        }
        (directory / "size.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, room: int = 0) -> LexicalIndex:
        """The saved index; ``room``: rows for items added after the build."""
        bm25 = bm25s.BM25.load(str(directory), show_progress=False)
        meta = json.loads((directory / "size.json").read_text())
        title = None
        if meta.get("title_index") and (directory / TITLE_DIR).exists():
            title = bm25s.BM25.load(str(directory / TITLE_DIR), show_progress=False)
        size, averages = int(meta["size"]), meta.get("average_lengths")
        return cls(
            bm25,
            size,
            bool(meta.get("stem", True)),
            title,
            size + room,
            (float(averages[0]), float(averages[1])) if averages else None,
        )
