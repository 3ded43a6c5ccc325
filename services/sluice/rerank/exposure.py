"""Fairness of exposure: who the providers are, which of them are the long tail, and the
FA*IR minimum of tail items per page prefix.

A *provider* is an item's brand; an item of unknown brand is its own provider (Amazon
Beauty has titles only, so there every item is one). The *head* is the smallest set of the
most popular providers that together hold ``head_share`` of the training interactions; the
rest is the *tail*, the protected group of the exposure target.

The target follows FA*IR (Zehlike et al., CIKM 2017): with a target tail share ``p`` and a
significance ``alpha``, every prefix of ``k`` items of a page holds at least ``m(k)`` tail
items, the ``alpha``-quantile of Binomial(k, p), so that no prefix rejects "tail items were
drawn with probability p". The test is not corrected for testing every prefix (FA*IR's
adjusted alpha): the uncorrected table asks slightly more of the page.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from sluice.data.catalog import UNKNOWN, Catalog


def provider_codes(catalog: Catalog) -> tuple[np.ndarray, int]:
    """Per catalog row, its provider (the brand code; ``len(brands) + row`` for an item of
    unknown brand), and the number of provider codes."""
    brands = len(catalog.brands)
    codes = catalog.brand_codes.astype(np.int64)
    if UNKNOWN in catalog.brands:
        unknown = catalog.brands.index(UNKNOWN)
        own = np.flatnonzero(codes == unknown)
        codes[own] = brands + own
    return codes, brands + len(catalog)


def tail_rows(catalog: Catalog, popularity: np.ndarray, head_share: float) -> np.ndarray:
    """Per catalog row, whether its provider is in the long tail.

    ``popularity`` counts training interactions per row. Providers are sorted by their
    total, most popular first (ties by code, so the split is deterministic); the head takes
    them until it holds ``head_share`` of all interactions. With no interactions at all
    there is no tail.
    """
    if not 0.0 < head_share <= 1.0:
        raise ValueError(f"head_share must be in (0, 1], not {head_share}")
    codes, count = provider_codes(catalog)
    totals = np.bincount(codes, weights=np.asarray(popularity, np.float64), minlength=count)
    total = totals.sum()
    if total <= 0:
        return np.zeros(len(catalog), dtype=bool)
    order = np.lexsort((np.arange(count), -totals))
    before = np.cumsum(totals[order]) - totals[order]  # what the head holds before each
    head = np.zeros(count, dtype=bool)
    head[order[before < head_share * total]] = True
    return ~head[codes]


def fair_minimums(length: int, share: float, alpha: float) -> np.ndarray:
    """``m[k]`` for ``k = 0 .. length``: the fewest tail items a prefix of ``k`` may hold."""
    if not 0.0 <= share <= 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need 0 <= share <= 1 and 0 < alpha < 1, not {share}, {alpha}")
    k = np.arange(length + 1)
    return np.maximum(np.nan_to_num(binom.ppf(alpha, k, share)), 0).astype(np.int64)
