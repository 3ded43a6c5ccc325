"""Non-neural baselines scored by the same metric code as the ranker.

* :class:`PopularityModel` — interaction counts over the sequences it is fitted
  on (pass only data that precedes the evaluated targets).
* :class:`CoocModel` — item-to-item co-occurrence: forward transitions within a
  window (weight ``1/distance``) plus, down-weighted, backward ones,
  normalised like a cosine, ``c(a, b) / sqrt(n(a) n(b))``. Its top-k
  neighbour table is what the recall stage's co-occurrence source serves.

The SASRec baseline is :class:`sluice.fine.model.FineRanker` with
``use_text=False``, trained by the same :func:`sluice.fine.train.train_ranker`.
All item ids here are catalog rows (0-based).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class PopularityModel:
    """Scores every item by how often it occurs in the fitted sequences."""

    counts: np.ndarray  # float64 [num_items]

    @classmethod
    def fit(cls, sequences: Sequence[np.ndarray], num_items: int) -> PopularityModel:
        rows = np.concatenate(
            [np.asarray(s, dtype=np.int64) for s in sequences] or [np.zeros(0, int)]
        )
        return cls(np.bincount(rows, minlength=num_items).astype(np.float64))

    def scores(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """``[B, num_items]``: the same popularity scores for every user."""
        return np.broadcast_to(self.counts, (len(histories), len(self.counts)))


# the co-occurrence window: 10 finds more of Amazon Beauty's next items than 3 did (docs/quality.md)
COOC_WINDOW = 10


@dataclass
class CoocModel:
    """Item-to-item co-occurrence of nearby interactions, cosine-normalised."""

    matrix: sp.csr_matrix  # [num_items, num_items], row a -> weights of items after a
    popularity: np.ndarray  # float64 [num_items], occurrences in the fitted sequences

    @classmethod
    def fit(
        cls,
        sequences: Sequence[np.ndarray],
        num_items: int,
        window: int = COOC_WINDOW,
        backward_weight: float = 0.5,
    ) -> CoocModel:
        """Count pairs ``(a, b)`` where ``b`` follows ``a`` within ``window`` steps.

        A pair at distance ``d`` adds ``1/d`` to ``c(a, b)`` and
        ``backward_weight / d`` to ``c(b, a)``; repeats of the same item are ignored.
        """
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s)]
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
        heads: list[np.ndarray] = []
        tails: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        for d in range(1, window + 1):
            same = (owner[:-d] == owner[d:]) & (flat[:-d] != flat[d:])
            a, b = flat[:-d][same], flat[d:][same]
            heads += [a, b]
            tails += [b, a]
            weights += [np.full(len(a), 1.0 / d), np.full(len(a), backward_weight / d)]
        counts = sp.coo_matrix(
            (
                np.concatenate(weights or [np.zeros(0)]),
                (
                    np.concatenate(heads or [np.zeros(0, int)]),
                    np.concatenate(tails or [np.zeros(0, int)]),
                ),
            ),
            shape=(num_items, num_items),
        ).tocsr()
        counts.sum_duplicates()
        popularity = np.bincount(flat, minlength=num_items).astype(np.float64)
        norm = 1.0 / np.sqrt(np.maximum(popularity, 1.0))
        matrix = sp.diags(norm) @ counts @ sp.diags(norm)
        return cls(sp.csr_matrix(matrix), popularity)

    @property
    def num_items(self) -> int:
        return int(self.matrix.shape[0])

    def neighbours(self, rows: Sequence[int] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours per row: ``(rows [n, k], scores [n, k])``, padded with -1 / 0."""
        rows = np.asarray(rows, dtype=np.int64)
        out_rows = np.full((len(rows), k), -1, dtype=np.int64)
        out_scores = np.zeros((len(rows), k), dtype=np.float32)
        indptr, indices, data = self.matrix.indptr, self.matrix.indices, self.matrix.data
        for i, r in enumerate(rows.tolist()):
            lo, hi = indptr[r], indptr[r + 1]
            if hi == lo:
                continue
            cols, vals = indices[lo:hi], data[lo:hi]
            # ties broken by popularity, then row, so the table is deterministic
            order = np.lexsort((cols, -self.popularity[cols], -vals))[:k]
            out_rows[i, : len(order)] = cols[order]
            out_scores[i, : len(order)] = vals[order]
        return out_rows, out_scores

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour table of every item: ``(rows [num_items, k], scores [num_items, k])``."""
        return self.neighbours(np.arange(self.num_items), k)

    def user_matrix(
        self, histories: Sequence[np.ndarray], last_n: int = 10, decay: float = 0.7
    ) -> sp.csr_matrix:
        """``[B, num_items]`` weights ``decay**age`` of the ``last_n`` most recent history items."""
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for i, h in enumerate(histories):
            recent = np.asarray(h, dtype=np.int64)[-last_n:][::-1]  # most recent first
            rows.append(np.full(len(recent), i))
            cols.append(recent)
            vals.append(decay ** np.arange(len(recent), dtype=np.float64))
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(histories), self.num_items),
        )

    def scores(
        self, histories: Sequence[np.ndarray], last_n: int = 10, decay: float = 0.7
    ) -> np.ndarray:
        """``[B, num_items]``: recency-weighted sum of the history items' co-occurrence rows.

        Items without co-occurrence evidence are ordered by popularity (a tie
        break far below any co-occurrence score).
        """
        dense: np.ndarray = (self.user_matrix(histories, last_n, decay) @ self.matrix).toarray()
        tie = 1e-9 * self.popularity / max(float(self.popularity.max()), 1.0)
        out: np.ndarray = dense + tie
        return out


def neighbour_table_scores(rows: np.ndarray, scores: np.ndarray, num_items: int) -> sp.csr_matrix:
    """A ``topk`` table as a sparse ``[num_items, num_items]`` matrix (what recall serves)."""
    keep = rows >= 0
    src = np.repeat(np.arange(rows.shape[0]), rows.shape[1]).reshape(rows.shape)
    return sp.csr_matrix(
        (scores[keep].astype(np.float64), (src[keep], rows[keep])), shape=(num_items, num_items)
    )
