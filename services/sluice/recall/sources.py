"""Recall's building blocks that need no index: row masks, seeds, co-occurrence, merging.

Pure numpy over the catalog's rows, shared by :class:`~sluice.recall.engine.RecallEngine`
and by the gateway's fallback (:mod:`sluice.gateway.fallback`), which serves from them
while the recall service is down, without FAISS or BM25.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sluice.data.catalog import Catalog
from sluice.data.filters import compile_filters
from sluice.domain import RRF_K, Candidates, RankContext, Source


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
    every list that found an item (all vectorized). ``item_ids`` maps rows to ids."""
    ordered = [s for s in quotas if s in lists] + [s for s in lists if s not in quotas]
    picked_rows: list[np.ndarray] = []
    picked_src: list[np.ndarray] = []
    leftovers: list[tuple[Source, np.ndarray]] = []
    taken = np.zeros(len(item_ids), dtype=bool)  # rows chosen so far (a mask: no sorting)
    count = 0
    for source in ordered:
        rows = lists[source][0]
        fresh = rows[~taken[rows]]
        take = min(round(quotas.get(source, 0.0) * budget), budget - count, len(fresh))
        picked_rows.append(fresh[:take])
        picked_src.append(np.full(take, int(source), dtype=np.int8))
        taken[fresh[:take]] = True
        count = int(np.count_nonzero(taken))
        leftovers.append((source, fresh[take:]))
    room = budget - count
    if room > 0:
        # round-robin over the sources' remaining lists: round i holds each source's i-th
        rows = np.concatenate([r for _, r in leftovers])
        rounds = np.concatenate([np.arange(len(r)) for _, r in leftovers])
        src = np.concatenate([np.full(len(r), int(s), np.int8) for s, r in leftovers])
        order = np.lexsort((np.arange(len(rows)), rounds))
        rows, src = rows[order], src[order]
        keep = ~taken[rows]
        rows, src = rows[keep], src[keep]
        _, first = np.unique(rows, return_index=True)
        first.sort()
        picked_rows.append(rows[first][:room])
        picked_src.append(src[first][:room])
    rows = np.concatenate(picked_rows)
    sources = np.concatenate(picked_src)

    fused = np.zeros(len(rows), dtype=np.float64)
    position = np.full(len(item_ids), -1, dtype=np.int32)  # row -> its place in ``rows``
    position[rows] = np.arange(len(rows), dtype=np.int32)
    for source_rows, _ in lists.values():
        pos = position[source_rows]
        hit = pos >= 0
        np.add.at(fused, pos[hit], 1.0 / (RRF_K + np.flatnonzero(hit)))
    order = np.argsort(-fused, kind="stable")
    return Candidates(item_ids[rows[order]], fused[order].astype(np.float32), sources[order])
