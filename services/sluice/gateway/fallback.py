"""What the gateway recalls from while the recall service is down.

Co-occurrence with the user's recent items (or the anchor item) and popularity, under the
request's filters and exclusions, merged like recall merges them: the same
:mod:`sluice.recall.sources` blocks, over tables the gateway loads at start (a few MB; no
FAISS, no BM25). A search gets popular items within its filters. The page it feeds is
flagged ``degraded`` on the recall stage.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.domain import Budget, Candidates, RankContext, Source
from sluice.recall.sources import (
    StaticPopularity,
    allowed_rows,
    cooc_neighbours,
    drop_hidden,
    merge,
    seed_rows,
)

QUOTAS: Mapping[Source, float] = {Source.CO_OCCURRENCE: 0.5, Source.POPULARITY: 0.5}


class FallbackRecall:
    """A recall engine (``retrieve``) from co-occurrence and build-time popularity only."""

    def __init__(
        self,
        catalog: Catalog,
        popularity: np.ndarray,
        cooc_rows: np.ndarray,
        cooc_scores: np.ndarray,
        history_window: int = 20,
        recency_decay: float = 0.85,
    ) -> None:
        self.catalog = catalog
        self.popularity = StaticPopularity(popularity)
        self.cooc_rows = cooc_rows
        self.cooc_scores = cooc_scores
        self.history_window = history_window
        self.recency_decay = recency_decay

    @classmethod
    def from_artifacts(cls, a: Artifacts) -> FallbackRecall:
        """The fallback, warmed up: its merge kernel is loaded now (compiled if the machine
        has no cache yet), not by the first request that finds the recall stage down."""
        _, rows, scores = a.cooc
        fallback = cls(a.catalog, a.popularity, rows, scores)
        fallback.retrieve(RankContext(), Budget(10))
        return fallback

    @property
    def catalog_size(self) -> int:
        return len(self.catalog)

    def retrieve(self, ctx: RankContext, budget: Budget) -> Candidates:
        k = budget.max_candidates
        allowed = allowed_rows(self.catalog, ctx)
        lists: dict[Source, tuple[np.ndarray, np.ndarray]] = {}
        seeds, weights = seed_rows(self.catalog, ctx, self.history_window, self.recency_decay)
        if len(seeds) and not ctx.is_search:
            lists[Source.CO_OCCURRENCE] = cooc_neighbours(
                self.cooc_rows, self.cooc_scores, seeds, weights, k, allowed
            )
        popular = self.popularity.top_rows(k, allowed)
        lists[Source.POPULARITY] = (popular, np.zeros(len(popular), np.float32))
        lists = {s: drop_hidden(self.catalog, found) for s, found in lists.items()}
        return merge(lists, QUOTAS, k, self.catalog.item_ids)
