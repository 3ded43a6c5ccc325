"""Per-item text tables for the coarse ranker's search features beyond BM25.

* ``title_bigram``: the share of the query's adjacent (stemmed) term pairs that
  occur adjacently in the item's title ("memory card" in "SanDisk 16GB Memory
  Card"); 0 for a one-term query. A phrase-level signal that neither BM25 (a
  bag of words) nor ``title_coverage`` has.
* ``description_length``: ``log(1 + tokens of the description)``. Long
  descriptions match more query terms by chance and dilute the MiniLM vector
  of the item text; the fitted weight corrects for both.

Titles are kept as pairs of term ids (one int64 per adjacent pair, sorted per
row, in CSR arrays), so a request gathers its candidates' pairs and matches
them against the query's in one vectorized step. Rows of items added after the
build (live catalog updates) are indexed by :meth:`TextFields.add`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import numpy as np

from sluice.data.tokens import tokenize

_SHIFT = np.int64(1 << 31)


class TextFields:
    """Title term pairs and description lengths of every catalog row."""

    def __init__(
        self, titles: Sequence[str], descriptions: Sequence[str] | None, stem: bool = True
    ) -> None:
        self.stem = stem
        self._vocab: dict[str, int] = {}
        self._lock = threading.Lock()
        pairs = [self._pairs(t) for t in titles]
        descs = descriptions or [""] * len(titles)
        self._set(pairs, [self._length(d) for d in descs])
        self._extra: dict[int, tuple[np.ndarray, float]] = {}  # live rows

    def _pairs(self, title: str) -> np.ndarray:
        vocab = self._vocab
        ids = np.asarray(
            [vocab.setdefault(t, len(vocab)) for t in tokenize(title, self.stem)], np.int64
        )
        return np.unique(ids[:-1] * _SHIFT + ids[1:]) if len(ids) > 1 else np.zeros(0, np.int64)

    def _length(self, description: str) -> float:
        return float(np.log1p(len(tokenize(description, self.stem)))) if description else 0.0

    def _set(self, pairs: list[np.ndarray], lengths: list[float]) -> None:
        sizes = np.fromiter((len(p) for p in pairs), np.int64, len(pairs))
        self._indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._data = np.concatenate(pairs) if pairs else np.zeros(0, np.int64)
        self._lengths = np.asarray(lengths, np.float32)

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, rows: Sequence[int], titles: Sequence[str], descriptions: Sequence[str]) -> None:
        """Index (or index again) items added after the build as ``rows``."""
        with self._lock:
            extra = dict(self._extra)
            for row, title, desc in zip(rows, titles, descriptions, strict=True):
                extra[int(row)] = (self._pairs(title), self._length(desc))
            self._extra = extra  # replaced whole: a request reads one consistent table

    def description_length(self, rows: np.ndarray) -> np.ndarray:
        """``log(1 + description tokens)`` of each row."""
        inside = rows < len(self._lengths)
        out = np.where(inside, self._lengths[np.where(inside, rows, 0)], 0.0).astype(np.float32)
        extra = self._extra
        if extra:
            for i in np.flatnonzero(np.isin(rows, np.fromiter(extra, np.int64, len(extra)))):
                out[i] = extra[int(rows[i])][1]
        return out

    def title_bigram(self, query: str, rows: np.ndarray) -> np.ndarray:
        """Share of the query's distinct adjacent term pairs found adjacent in each row's title."""
        out = np.zeros(len(rows), np.float32)
        wanted = set(itertools.pairwise(tokenize(query, self.stem)))
        if not wanted:
            return out
        # a pair with a term no title has counts in the share but matches nothing
        vocab = self._vocab
        known = np.array(
            sorted(
                vocab[a] * int(_SHIFT) + vocab[b] for a, b in wanted if a in vocab and b in vocab
            ),
            np.int64,
        )
        if len(known) == 0:
            return out
        inside = rows < len(self._lengths)
        safe = np.where(inside, rows, 0)
        starts, ends = self._indptr[safe], self._indptr[safe + 1]
        lengths = np.where(inside, ends - starts, 0)
        n = int(lengths.sum())
        if n:
            entry = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            entry += np.repeat(starts, lengths)
            hit = np.isin(self._data[entry], known)
            owner = np.repeat(np.arange(len(rows)), lengths)
            out += np.bincount(owner[hit], minlength=len(rows)).astype(np.float32)
        extra = self._extra
        if extra:
            for i in np.flatnonzero(~inside | np.isin(rows, np.fromiter(extra, np.int64))):
                found = extra.get(int(rows[i]))
                out[i] = float(np.isin(found[0], known).sum()) if found is not None else 0.0
        return out / len(wanted)
