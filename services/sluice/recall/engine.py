"""Recall: several candidate sources merged under per-source quotas.

Sources (each returns catalog rows, best first, already filtered):

* ``ANN`` — FAISS over learned item vectors with a user vector (recency-
  weighted history) for recommendation, or over MiniLM text vectors with the
  query embedding for search.
* ``LEXICAL`` — BM25 over item text (search only).
* ``CO_OCCURRENCE`` — items that follow the user's recent items in other
  shoppers' sequences.
* ``POPULARITY`` — the fallback for cold starts and thin sources.

Filters become a row mask that every source applies *inside* its search
(FAISS ID selectors, BM25 weight masks, masked popularity), so a filter never
eats into the candidate budget. Each source first fills its quota; leftover
budget goes to the other sources' next best; the merged list is ordered by
reciprocal-rank fusion over the sources that found each item.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.data.filters import compile_filters
from sluice.domain import RRF_K, Budget, Candidates, RankContext, Source
from sluice.recall.ann_index import AnnIndex
from sluice.recall.lexical import LexicalIndex


class PopularitySource(Protocol):
    """Rows ordered by popularity (static counts or live trending)."""

    def top_rows(self, k: int, allowed: np.ndarray | None) -> np.ndarray: ...


@dataclass
class StaticPopularity:
    """Popularity counted at build time."""

    scores: np.ndarray  # float [n]
    order: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.order = np.argsort(-self.scores, kind="stable")

    def top_rows(self, k: int, allowed: np.ndarray | None) -> np.ndarray:
        return first_allowed(self.order, k, allowed)


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
class RecallAssets:
    """Everything recall reads, loaded once per process."""

    catalog: Catalog
    behaviour_vectors: np.ndarray  # float32 [n, d], L2-normalised
    behaviour_index: AnnIndex
    text_vectors: np.ndarray  # float32 [n, 384], L2-normalised
    text_index: AnnIndex
    lexical: LexicalIndex
    cooc_rows: np.ndarray  # int64 [n, k], -1 padded
    cooc_scores: np.ndarray  # float32 [n, k]
    popularity: PopularitySource

    @classmethod
    def from_artifacts(
        cls, a: Artifacts, popularity: PopularitySource | None = None, use_gpu: bool | None = None
    ) -> RecallAssets:
        _, top_rows, top_scores = a.cooc
        return cls(
            catalog=a.catalog,
            behaviour_vectors=a.behaviour_vectors,
            behaviour_index=AnnIndex.load(a.root / "behaviour.faiss", use_gpu=use_gpu),
            text_vectors=a.text_vectors,
            text_index=AnnIndex.load(a.root / "text.faiss", use_gpu=use_gpu),
            lexical=LexicalIndex.load(a.root / "lexical"),
            cooc_rows=top_rows,
            cooc_scores=top_scores,
            popularity=popularity or StaticPopularity(a.popularity),
        )


@dataclass
class RecallConfig:
    """Budget split between sources and how history is weighted."""

    recommend_quotas: Mapping[Source, float] = field(
        default_factory=lambda: {Source.CO_OCCURRENCE: 0.4, Source.ANN: 0.4, Source.POPULARITY: 0.2}
    )
    search_quotas: Mapping[Source, float] = field(
        default_factory=lambda: {Source.LEXICAL: 0.5, Source.ANN: 0.4, Source.POPULARITY: 0.1}
    )
    history_window: int = 20
    recency_decay: float = 0.85


class RecallEngine:
    """The recall stage: pure logic over the loaded assets."""

    def __init__(self, assets: RecallAssets, config: RecallConfig | None = None) -> None:
        self.assets = assets
        self.config = config or RecallConfig()

    @property
    def catalog_size(self) -> int:
        return len(self.assets.catalog)

    # -- public --------------------------------------------------------------
    def retrieve(self, ctx: RankContext, budget: Budget) -> Candidates:
        max_candidates = budget.max_candidates
        catalog = self.assets.catalog
        filt = compile_filters(catalog, ctx.filters)
        allowed = filt.mask.copy() if filt.mask is not None else None
        excluded = catalog.rows(ctx.exclude_item_ids)
        excluded = excluded[excluded >= 0]
        if len(excluded):
            if allowed is None:
                allowed = np.ones(len(catalog), dtype=bool)
            allowed[excluded] = False
        history = catalog.rows(ctx.history_item_ids)
        history = history[history >= 0][-self.config.history_window :]

        lists: dict[Source, tuple[np.ndarray, np.ndarray]] = {}
        if ctx.is_search:
            quotas = self.config.search_quotas
            lists[Source.LEXICAL] = self.assets.lexical.search(ctx.query, max_candidates, allowed)
            if ctx.query_embedding is not None:
                lists[Source.ANN] = self._ann(
                    self.assets.text_index, ctx.query_embedding, max_candidates, allowed
                )
        else:
            quotas = self.config.recommend_quotas
            anchor = catalog.row(ctx.context_item_id) if ctx.context_item_id else -1
            seeds, weights = self._seeds(history, anchor)
            if len(seeds):
                user_vec = weights @ self.assets.behaviour_vectors[seeds]
                lists[Source.ANN] = self._ann(
                    self.assets.behaviour_index, user_vec, max_candidates, allowed
                )
                lists[Source.CO_OCCURRENCE] = self._cooc(seeds, weights, max_candidates, allowed)
        pop_rows = self.assets.popularity.top_rows(max_candidates, allowed)
        lists[Source.POPULARITY] = (pop_rows, np.zeros(len(pop_rows), np.float32))
        return self._merge(lists, quotas, max_candidates)

    # -- sources ---------------------------------------------------------------
    def _seeds(self, history: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows that stand for the user, most recent weighted highest."""
        if anchor >= 0:
            return np.array([anchor], dtype=np.int64), np.ones(1, dtype=np.float32)
        if len(history) == 0:
            return history, np.zeros(0, dtype=np.float32)
        ages = np.arange(len(history))[::-1]
        weights = (self.config.recency_decay**ages).astype(np.float32)
        return history, weights / weights.sum()

    @staticmethod
    def _ann(
        index: AnnIndex, vector: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        norm = float(np.linalg.norm(q))
        if norm == 0.0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = q / norm
        if allowed is None:
            scores, rows = index.search(q, k)
        else:
            scores, rows = index.search_filtered(q, k, allowed)
        keep = rows[0] >= 0
        return rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

    def _cooc(
        self, seeds: np.ndarray, weights: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        neigh = self.assets.cooc_rows[seeds]
        score = self.assets.cooc_scores[seeds] * weights[:, None]
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

    # -- merge -----------------------------------------------------------------
    def _merge(
        self,
        lists: dict[Source, tuple[np.ndarray, np.ndarray]],
        quotas: Mapping[Source, float],
        budget: int,
    ) -> Candidates:
        """Quota phase, then round-robin fill, then reciprocal-rank fusion; all vectorized."""
        ordered = [s for s in quotas if s in lists] + [s for s in lists if s not in quotas]
        picked_rows: list[np.ndarray] = []
        picked_src: list[np.ndarray] = []
        leftovers: list[tuple[Source, np.ndarray]] = []
        taken = np.zeros(0, dtype=np.int64)  # sorted rows chosen so far
        for source in ordered:
            rows = lists[source][0]
            fresh = rows[~_member(rows, taken)]
            take = min(round(quotas.get(source, 0.0) * budget), budget - len(taken), len(fresh))
            picked_rows.append(fresh[:take])
            picked_src.append(np.full(take, int(source), dtype=np.int8))
            taken = np.union1d(taken, fresh[:take])
            leftovers.append((source, fresh[take:]))
        room = budget - len(taken)
        if room > 0:
            # round-robin over the sources' remaining lists: round i holds each source's i-th
            rows = np.concatenate([r for _, r in leftovers])
            rounds = np.concatenate([np.arange(len(r)) for _, r in leftovers])
            src = np.concatenate([np.full(len(r), int(s), np.int8) for s, r in leftovers])
            order = np.lexsort((np.arange(len(rows)), rounds))
            rows, src = rows[order], src[order]
            keep = ~_member(rows, taken)
            rows, src = rows[keep], src[keep]
            _, first = np.unique(rows, return_index=True)
            first.sort()
            picked_rows.append(rows[first][:room])
            picked_src.append(src[first][:room])
        rows = np.concatenate(picked_rows)
        sources = np.concatenate(picked_src)

        fused = np.zeros(len(rows), dtype=np.float64)
        sorter = np.argsort(rows)
        for source_rows, _ in lists.values():
            pos = np.searchsorted(rows, source_rows, sorter=sorter)
            pos = np.minimum(pos, len(rows) - 1)
            hit = rows[sorter[pos]] == source_rows if len(rows) else np.zeros(0, bool)
            np.add.at(fused, sorter[pos[hit]], 1.0 / (RRF_K + np.flatnonzero(hit)))
        order = np.argsort(-fused, kind="stable")
        item_ids = self.assets.catalog.item_ids[rows[order]]
        return Candidates(item_ids, fused[order].astype(np.float32), sources[order])


def _member(rows: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of ``rows`` are in the sorted array ``sorted_set``."""
    if len(sorted_set) == 0 or len(rows) == 0:
        return np.zeros(len(rows), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, rows), len(sorted_set) - 1)
    return sorted_set[pos] == rows
