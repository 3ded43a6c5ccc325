"""Re-ranking: business rules, dedupe, per-brand caps, MMR diversity, pagination.

The merchant's rules reach it in the context (:mod:`sluice.rules`): blocks as ``not_brand``
and ``not_category`` filters and excluded ids, which :meth:`RerankEngine._eligible` drops
like any filter; boosts, added to the scaled relevance before MMR; pins, placed last.

An exposure target (:mod:`sluice.rerank.exposure`, off by default) holds every page prefix
to FA*IR's minimum of long-tail providers' items: while a prefix is short of it, the MMR
step picks among the tail items only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from sluice.core.errors import InvalidArgument
from sluice.data.catalog import Catalog
from sluice.domain import Budget, Candidates, RankContext
from sluice.kernels import mmr_order
from sluice.rerank.exposure import fair_minimums
from sluice.rules import apply_boosts, eligible, place_pins

_VARIANT = re.compile(r"\s+-\s+[^-]*$")


def title_key(title: str) -> str:
    """Normalised title without a trailing " - variant", for near-duplicate removal."""
    return " ".join(_VARIANT.sub("", title).lower().split())


@dataclass
class RerankConfig:
    diversity_lambda: float = 0.85  # 1.0 = relevance only
    max_per_brand: int = 4  # per page window; 0 disables the cap
    require_in_stock: bool = True
    window: int = 100  # MMR looks this far down the relevance list
    tail_share: float = 0.0  # FA*IR target share of long-tail providers' items; 0 disables
    tail_alpha: float = 0.1  # FA*IR significance: lower asks fewer tail items per prefix
    # the MMR lambda of search requests (a query): relevant products for one query look
    # alike, so diversity costs search relevance (docs/quality.md); None: diversity_lambda
    search_diversity_lambda: float | None = 1.0


class RerankEngine:
    """The re-ranking stage: orders the fine-ranked list so that its pages are final."""

    def __init__(
        self,
        catalog: Catalog,
        item_vectors: np.ndarray,
        config: RerankConfig | None = None,
        tail: np.ndarray | None = None,
    ):
        """``tail``: per catalog row, whether its provider is in the long tail
        (:func:`sluice.rerank.exposure.tail_rows`); needed for ``config.tail_share``."""
        self.catalog = catalog
        self.vectors = item_vectors
        self.config = config or RerankConfig()
        # dedupe keys as integer codes per row, so that dedupe is one vectorized step
        self._key_codes: dict[str, int] = {}
        self._keys = np.array([self._code(title_key(t)) for t in catalog.titles], np.int64)
        if self.config.tail_share > 0 and tail is None:
            raise ValueError("an exposure target (tail_share > 0) needs the tail rows")
        self.tail = tail

    def learn_titles(self, rows: np.ndarray) -> None:
        """Dedupe keys of rows whose title changed (items added by a live update)."""
        for row in rows.tolist():
            self._keys[row] = self._code(title_key(self.catalog.titles[row]))

    def _code(self, key: str) -> int:
        return self._key_codes.setdefault(key, len(self._key_codes))

    def rank(self, ctx: RankContext, cands: Candidates, budget: Budget) -> Candidates:
        """Every eligible candidate, in final order up to the end of the budget's page
        (``offset + max_candidates``) and in relevance order after it."""
        config = self.config
        changes = ctx.rerank.config_changes()
        if changes:  # an experiment arm's settings, for this request only
            if changes.get("tail_share", 0) > 0 and self.tail is None:
                raise InvalidArgument(
                    "this stage knows no long tail", field_path="context.rerank.exposure_tail_share"
                )
            config = dataclasses.replace(config, **changes)
        if ctx.is_search and config.search_diversity_lambda is not None:
            # search pages have their own lambda: an arm's diversity_lambda is the
            # recommendation one, so a recommendation experiment leaves search pages alone
            config = dataclasses.replace(config, diversity_lambda=config.search_diversity_lambda)
        eligible = apply_boosts(self.catalog, self._eligible(ctx, cands), ctx.boosts)
        ranked = self._mmr(eligible, budget.offset + budget.max_candidates, config)
        return place_pins(ranked, ctx.pins, lambda ids: self.allows(ctx, ids))

    def allows(self, ctx: RankContext, item_ids: np.ndarray) -> np.ndarray:
        return eligible(self.catalog, ctx, item_ids, self.config.require_in_stock)

    def _eligible(self, ctx: RankContext, cands: Candidates) -> Candidates:
        """Apply filters, stock, exclusions and dedupe; keep the relevance order."""
        cands = cands.top(len(cands))
        rows = self.catalog.rows(cands.item_ids)
        kept = np.flatnonzero(self.allows(ctx, cands.item_ids))
        # the first of each title key in relevance order (an item id seen twice has one row,
        # so one key: its later copies go too)
        _, first = np.unique(self._keys[rows[kept]], return_index=True)
        keep = np.zeros(len(cands), dtype=bool)
        keep[kept[first]] = True
        return cands.take(np.flatnonzero(keep))

    def _mmr(self, cands: Candidates, needed: int, config: RerankConfig) -> Candidates:
        """Greedy maximal marginal relevance with a per-brand cap, over the first ``needed``."""
        lam = config.diversity_lambda
        n = len(cands)
        if n == 0:
            return cands
        limit = min(n, max(needed, 0) + config.window)
        head = cands.take(np.arange(limit))
        rows = self.catalog.rows(head.item_ids)
        rel = head.scores.astype(np.float64)
        span = rel.max() - rel.min()
        rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
        target = min(needed, limit)
        tail, minimums = None, None
        if self.tail is not None and config.tail_share > 0:
            tail = self.tail[rows]
            minimums = fair_minimums(target, config.tail_share, config.tail_alpha)
        # each step: lam * rel - (1 - lam) * (similarity to the closest chosen item, 0 before
        # the first pick), 10 lower for a capped brand (those go last, not away)
        chosen = mmr_order(
            lam * rel,
            self.vectors,
            rows,
            self.catalog.brand_codes[rows],
            lam=lam,
            cap=config.max_per_brand,
            target=target,
            tail=tail,
            minimums=minimums,
        )
        free = np.ones(limit, dtype=bool)
        free[chosen] = False
        rest = np.concatenate([np.flatnonzero(free), np.arange(limit, n)])
        order = np.concatenate([np.asarray(chosen, dtype=np.int64), rest.astype(np.int64)])
        return cands.take(order)
