"""Why each item is on a page: a reason code with its evidence, from the signals that ranked it.

The gateway explains a page after it is ranked, from the build's item vectors (the learned
item space recall's ANN source and the ranker's item table come from; memory-mapped),
popularity and the item texts:
- a merchant's pin: ``PROMOTED``;
- a search: ``MATCHES_QUERY`` with the query's words the item's text contains (stemmed as
  BM25 stems them);
- a similar-items page: ``SIMILAR_TO`` the anchor;
- a user's page: ``BECAUSE_YOU_VIEWED`` the recent items that add most to the item's
  behavioural score. Recall scores an item by its similarity to the recency-weighted sum of
  the user's recent items, so each recent item adds its weight times its similarity: the
  evidence is the (at most 4) largest of these terms;
- otherwise ``POPULAR_IN_CATEGORY`` for an item in the top tenth of its category, or
  ``TRENDING_NOW`` for an item that live popularity recalled.
Removing the evidence moves the item down (faithfulness): ``tests/stages/test_explain.py``
and ``docs/features.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.data.tokens import tokenize
from sluice.domain import RankContext, Source
from sluice.recall.sources import seed_rows

# words too common to explain anything
_STOP = frozenset(
    {"a", "an", "and", "the", "for", "of", "in", "on", "with", "to", "by", "at", "from", "or"}
    | {"is", "are", "be", "it", "this", "that", "these", "those", "as", "de", "la", "le", "y"}
)
MAX_EVIDENCE = 4  # chosen on users the faithfulness test does not use: 3 gave 0.91, 4 gave 0.94
HISTORY_WINDOW = 20  # what recall's co-occurrence source reads (RecallConfig.history_window)
RECENCY_DECAY = 0.85
MIN_SIMILARITY = 0.3  # cite recent items only when one of them is at least this close
POPULAR_SHARE = 0.1  # POPULAR_IN_CATEGORY: within the top tenth of its category


class ReasonCode(IntEnum):
    """Numbers match ``sluice.v1.ReasonCode``."""

    UNSPECIFIED = 0
    BECAUSE_YOU_VIEWED = 1
    MATCHES_QUERY = 2
    POPULAR_IN_CATEGORY = 3
    TRENDING_NOW = 4
    SIMILAR_TO = 5
    PROMOTED = 6


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    evidence_item_ids: tuple[int, ...] = ()
    matched_terms: tuple[str, ...] = ()
    category: str = ""


def query_terms(query: str) -> dict[str, str]:
    """The query's words (lower-cased, the commonest left out) by their BM25 stem."""
    words = [w for w in tokenize(query, stem=False) if w not in _STOP]
    return dict(zip(tokenize(" ".join(words)), words, strict=True))


class Explainer:
    def __init__(
        self,
        catalog: Catalog,
        popularity: np.ndarray,
        vectors: np.ndarray,
        live_popularity: bool = False,
    ) -> None:
        self.catalog = catalog
        self.vectors = vectors
        self.live_popularity = live_popularity
        # each build item's popularity rank within its category, as a share of the category
        # (items added live since the build have no popularity yet: never popular)
        n = catalog.build_size
        pop = np.asarray(popularity[:n], np.float64)
        order = np.lexsort((-pop, catalog.category_codes[:n]))
        codes = catalog.category_codes[order]
        starts = np.searchsorted(codes, codes, side="left")
        sizes = np.bincount(catalog.category_codes[:n], minlength=len(catalog.categories))
        rank = np.ones(len(catalog), np.float64)
        rank[order] = (np.arange(len(order)) - starts) / np.maximum(sizes[codes], 1)
        self.category_rank = rank

    @classmethod
    def from_artifacts(cls, a: Artifacts, live_popularity: bool = False) -> Explainer:
        # mapped, not read: the build's rows (items added live have none, see _behaviour)
        vectors = np.load(a.root / "behaviour_vectors.npy", mmap_mode="r")
        return cls(a.catalog, a.popularity, vectors, live_popularity)

    def explain(self, ctx: RankContext, item_ids: np.ndarray, sources: np.ndarray) -> list[Reason]:
        rows = self.catalog.rows(item_ids)
        pinned = {p.item_id for p in ctx.pins}
        words = query_terms(ctx.query) if ctx.query else {}
        seeds, weights = seed_rows(self.catalog, ctx, HISTORY_WINDOW, RECENCY_DECAY)
        anchor = ctx.context_item_id if ctx.context_item_id and len(seeds) else 0
        out = []
        for item, row, source in zip(
            item_ids.tolist(), rows.tolist(), sources.tolist(), strict=True
        ):
            if row < 0:
                out.append(Reason(ReasonCode.UNSPECIFIED))
            elif item in pinned:
                out.append(Reason(ReasonCode.PROMOTED))
            elif words and (
                hit := [words[t] for t in tokenize(self.catalog.text(row)) if t in words]
            ):
                out.append(
                    Reason(ReasonCode.MATCHES_QUERY, matched_terms=tuple(dict.fromkeys(hit)))
                )
            elif anchor:
                out.append(Reason(ReasonCode.SIMILAR_TO, (anchor,)))
            else:
                out.append(self._behaviour(row, seeds, weights) or self._popular(row, source))
        return out

    def _behaviour(self, row: int, seeds: np.ndarray, weights: np.ndarray) -> Reason | None:
        """The user's recent items that add most to ``row``'s behavioural score, if any."""
        known = seeds < len(self.vectors)  # items added live since the build have no vector
        seeds, weights = seeds[known], weights[known]
        if not len(seeds) or row >= len(self.vectors):
            return None
        vecs = _unit(np.asarray(self.vectors[seeds], np.float32))
        item = _unit(np.asarray(self.vectors[row : row + 1], np.float32))[0]
        sims = vecs @ item
        if sims.max() < MIN_SIMILARITY:
            return None
        contribution = weights * np.maximum(sims, 0.0)
        order = np.argsort(-contribution, kind="stable")[:MAX_EVIDENCE]
        ids = self.catalog.item_ids[seeds[order[contribution[order] > 0]]]
        return Reason(ReasonCode.BECAUSE_YOU_VIEWED, tuple(dict.fromkeys(ids.tolist())))

    def _popular(self, row: int, source: int) -> Reason:
        if source == Source.POPULARITY and self.live_popularity:
            return Reason(ReasonCode.TRENDING_NOW)
        if self.category_rank[row] < POPULAR_SHARE:
            category = self.catalog.categories[self.catalog.category_codes[row]]
            return Reason(ReasonCode.POPULAR_IN_CATEGORY, category=category)
        return Reason(ReasonCode.UNSPECIFIED)


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)
