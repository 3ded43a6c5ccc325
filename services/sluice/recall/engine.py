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
from sluice.domain import Budget, Candidates, RankContext, Source
from sluice.recall.ann_index import AnnIndex
from sluice.recall.lexical import LexicalIndex
from sluice.recall.sources import (
    RowLookup,
    StaticPopularity,
    allowed_rows,
    best_first,
    cooc_neighbours,
    drop_hidden,
    merge,
    seed_rows,
)


class PopularitySource(Protocol):
    """Rows ordered by popularity (static counts or live trending)."""

    def top_rows(self, k: int, allowed: np.ndarray | None) -> np.ndarray: ...

    def scores_of(self, rows: np.ndarray) -> np.ndarray:
        """The score the order follows, for ``rows``."""
        ...


@dataclass
class RecallAssets:
    """Everything recall reads, loaded once per process.

    Rows are those of ``catalog``, the items this engine returns. The user stands for
    *seeds*, items of the whole catalog found with ``seeds`` (for a recall shard, which
    serves a slice of the catalog, these are the whole catalog's rows)."""

    catalog: Catalog
    behaviour_vectors: np.ndarray  # float32 [seed rows, d], L2-normalised: the user vector
    behaviour_index: AnnIndex
    text_index: AnnIndex
    lexical: LexicalIndex
    cooc_rows: np.ndarray  # int [seed rows, k]: rows that follow each seed, -1 padded
    cooc_scores: np.ndarray  # float32 [seed rows, k]
    popularity: PopularitySource
    seeds: RowLookup | None = None  # None: the catalog itself
    # text vectors of every row, for items added live (rows from catalog.build_size on),
    # which the build's text index does not hold: searched exactly. None: no live items
    live_text_vectors: np.ndarray | None = None

    @property
    def seed_lookup(self) -> RowLookup:
        return self.catalog if self.seeds is None else self.seeds

    @classmethod
    def from_artifacts(
        cls, a: Artifacts, popularity: PopularitySource | None = None, use_gpu: bool | None = None
    ) -> RecallAssets:
        _, top_rows, top_scores = a.cooc
        return cls(
            catalog=a.catalog,
            behaviour_vectors=a.behaviour_vectors,
            behaviour_index=AnnIndex.load(a.root / "behaviour.faiss", use_gpu=use_gpu),
            text_index=AnnIndex.load(a.root / "text.faiss", use_gpu=use_gpu),
            lexical=LexicalIndex.load(a.root / "lexical", a.room),
            cooc_rows=top_rows,
            cooc_scores=top_scores,
            popularity=popularity or StaticPopularity(a.popularity),
            live_text_vectors=a.text_vectors if a.room else None,
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

    def quotas(self, ctx: RankContext) -> Mapping[Source, float]:
        return self.config.search_quotas if ctx.is_search else self.config.recommend_quotas

    # -- public --------------------------------------------------------------
    def retrieve(self, ctx: RankContext, budget: Budget) -> Candidates:
        k = budget.max_candidates
        return merge(self.source_lists(ctx, k), self.quotas(ctx), k, self.assets.catalog.item_ids)

    def source_lists(self, ctx: RankContext, k: int) -> dict[Source, tuple[np.ndarray, np.ndarray]]:
        """Each source's best ``k`` allowed rows with its scores, in
        :func:`~sluice.recall.sources.best_first` order (unmerged: a recall shard's answer)."""
        catalog = self.assets.catalog
        allowed = allowed_rows(catalog, ctx)
        lists: dict[Source, tuple[np.ndarray, np.ndarray]] = {}
        if ctx.is_search:
            lists[Source.LEXICAL] = self.assets.lexical.search(ctx.query, k, allowed)
            if ctx.query_embedding is not None:
                found = self._ann(self.assets.text_index, ctx.query_embedding, k, allowed)
                lists[Source.ANN] = self._with_live_items(found, ctx.query_embedding, k, allowed)
        else:
            seeds, weights = seed_rows(
                self.assets.seed_lookup, ctx, self.config.history_window, self.config.recency_decay
            )
            if len(seeds):
                user_vec = weights @ self.assets.behaviour_vectors[seeds]
                lists[Source.ANN] = self._ann(self.assets.behaviour_index, user_vec, k, allowed)
                lists[Source.CO_OCCURRENCE] = cooc_neighbours(
                    self.assets.cooc_rows, self.assets.cooc_scores, seeds, weights, k, allowed
                )
        pop_rows = self.assets.popularity.top_rows(k, allowed)
        lists[Source.POPULARITY] = (pop_rows, self.assets.popularity.scores_of(pop_rows))
        return {source: drop_hidden(catalog, found) for source, found in lists.items()}

    def _with_live_items(
        self,
        found: tuple[np.ndarray, np.ndarray],
        query: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The text index's list with the items added live since the build, scored exactly
        (they are few: at most the catalog's room) and merged in by score."""
        catalog, vectors = self.assets.catalog, self.assets.live_text_vectors
        live = np.arange(catalog.build_size, catalog.live_end)
        if vectors is None or not len(live):
            return found
        if allowed is not None:
            live = live[allowed[live]]
        q = np.asarray(query, dtype=np.float32)
        scores = vectors[live] @ (q / max(float(np.linalg.norm(q)), 1e-12))
        rows, merged = best_first(
            np.concatenate([found[0], live]), np.concatenate([found[1], scores.astype(np.float32)])
        )
        return rows[:k], merged[:k]

    # -- sources ---------------------------------------------------------------
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
        else:  # the index holds the build's rows; items added live come after them
            scores, rows = index.search_filtered(q, k, allowed[: index.ntotal])
        keep = rows[0] >= 0
        return best_first(rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32))
