"""Recall's building blocks that need no index: row masks, seeds, co-occurrence, merging.

Numpy over the catalog's rows (the merge: a compiled kernel, :mod:`sluice.kernels`), shared
by :class:`~sluice.recall.engine.RecallEngine` and by the gateway's fallback
(:mod:`sluice.gateway.fallback`), which serves from them while the recall service is down,
without FAISS or BM25.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sluice.data.catalog import Catalog
from sluice.data.filters import compile_filters
from sluice.domain import RRF_K, Candidates, RankContext, Source
from sluice.kernels import merge_lists


def first_allowed(order: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
    """The first ``k`` rows of ``order`` that the row mask ``allowed`` lets through.

    Looks at a short head of the order first: with a few exclusions (the usual case) that is
    enough, and the whole catalog is never gathered."""
    if allowed is None:
        return order[:k]
    head = order[: 2 * k + 64]
    picked = head[allowed[head]]
    if len(picked) >= k or len(head) == len(order):
        return picked[:k]
    return order[allowed[order]][:k]


@dataclass
class StaticPopularity:
    """Popularity counted at build time."""

    scores: np.ndarray  # float [n]
    order: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.order = np.argsort(-self.scores, kind="stable")

    def top_rows(self, k: int, allowed: np.ndarray | None) -> np.ndarray:
        return first_allowed(self.order, k, allowed)

    def scores_of(self, rows: np.ndarray) -> np.ndarray:
        return self.scores[rows].astype(np.float32)


class RowLookup(Protocol):
    """Item ids to rows (a :class:`~sluice.data.catalog.Catalog` or its id index)."""

    def rows(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray: ...

    def row(self, item_id: int) -> int: ...


def best_first(rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A source's list in the one order every layout uses: score descending, ties by row.

    Recall shards hold contiguous row ranges, so this is also the order a front merging the
    shards' lists gets by shard, then position (:mod:`sluice.recall.shards`)."""
    order = np.lexsort((rows, -scores))
    return rows[order], scores[order]


def allowed_rows(catalog: Catalog, ctx: RankContext) -> np.ndarray | None:
    """The rows the request's filters and exclusions let through (None: every row)."""
    filt = compile_filters(catalog, ctx.filters)
    allowed = filt.mask.copy() if filt.mask is not None else None
    excluded = catalog.rows(ctx.exclude_item_ids)
    excluded = excluded[excluded >= 0]
    if len(excluded):
        if allowed is None:
            allowed = ~catalog.hidden
        allowed[excluded] = False
    return allowed


def drop_hidden(
    catalog: Catalog, found: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A source's rows without hidden ones (a catalog with room for live items has empty rows
    that no mask covers when the request has none)."""
    rows, scores = found
    if catalog.build_size == len(catalog) and not catalog.deleted:
        return found
    keep = ~catalog.hidden[rows]
    return (rows, scores) if keep.all() else (rows[keep], scores[keep])


def seed_rows(
    catalog: RowLookup, ctx: RankContext, window: int, decay: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rows that stand for the user, with weights: the anchor item alone when there is one,
    else the last ``window`` history items, the most recent weighted highest. ``catalog``
    looks up every item (a recall shard looks up items outside its slice too)."""
    anchor = catalog.row(ctx.context_item_id) if ctx.context_item_id else -1
    if anchor >= 0:
        return np.array([anchor], dtype=np.int64), np.ones(1, dtype=np.float32)
    history = catalog.rows(ctx.history_item_ids)
    history = history[history >= 0][-window:]
    if len(history) == 0:
        return history, np.zeros(0, dtype=np.float32)
    ages = np.arange(len(history))[::-1]
    weights = (decay**ages).astype(np.float32)
    return history, weights / weights.sum()


def cooc_neighbours(
    cooc_rows: np.ndarray,
    cooc_scores: np.ndarray,
    seeds: np.ndarray,
    weights: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` allowed rows that most often follow the seeds, with their weighted counts."""
    neigh = cooc_rows[seeds]
    score = cooc_scores[seeds] * weights[:, None]
    flat_rows, flat_scores = neigh.ravel(), score.ravel()
    valid = flat_rows >= 0
    if allowed is not None:
        valid &= allowed[np.maximum(flat_rows, 0)]
    flat_rows, flat_scores = flat_rows[valid], flat_scores[valid]
    if len(flat_rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    uniq, inverse = np.unique(flat_rows, return_inverse=True)
    total = np.bincount(inverse, weights=flat_scores).astype(np.float32)
    order = np.argsort(-total, kind="stable")[:k]
    return uniq[order].astype(np.int64), total[order]


def merge(
    lists: Mapping[Source, tuple[np.ndarray, np.ndarray]],
    quotas: Mapping[Source, float],
    budget: int,
    item_ids: np.ndarray,
) -> Candidates:
    """The sources' row lists merged into ``budget`` candidates: each source fills its quota,
    the leftovers go round-robin, and the result is ordered by reciprocal-rank fusion over
    every list that found an item, in one compiled pass (:func:`sluice.kernels.merge_lists`).
    ``item_ids`` maps rows to ids."""
    ordered = [s for s in quotas if s in lists] + [s for s in lists if s not in quotas]
    rows, sources, fused = merge_lists(
        [lists[s][0] for s in ordered],
        [round(quotas.get(s, 0.0) * budget) for s in ordered],
        [int(s) for s in ordered],
        [ordered.index(s) for s in lists],
        budget,
        RRF_K,
        len(item_ids),
    )
    order = np.argsort(-fused, kind="stable")
    return Candidates(item_ids[rows[order]], fused[order].astype(np.float32), sources[order])
