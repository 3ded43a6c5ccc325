"""Fairness of exposure: providers, the long tail, FA*IR's minimums and the exposure metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from sluice.data.catalog import Catalog
from sluice.eval.exposure import exposure_metrics, gini
from sluice.rerank.exposure import fair_minimums, provider_codes, tail_rows


def shop() -> Catalog:
    # rows 0-2 brand a, 3-4 brand b, 5 brand c, 6-7 no brand (each its own provider)
    brands = ["a", "a", "a", "b", "b", "c", "", ""]
    return Catalog.from_columns(list(range(10, 18)), [f"t{i}" for i in range(8)], brands=brands)


def test_providers_are_brands_and_unbranded_items_stand_alone() -> None:
    codes, count = provider_codes(shop())
    assert codes[0] == codes[1] == codes[2] and codes[3] == codes[4]
    assert len(set(codes.tolist())) == 5  # a, b, c and the two unbranded items
    assert codes[6] != codes[7] and max(codes) < count


def test_the_head_holds_the_share_of_interactions_and_the_rest_is_the_tail() -> None:
    catalog = shop()
    # a: 60 interactions, b: 25, c: 10, the unbranded items 3 and 2
    popularity = np.array([30, 20, 10, 20, 5, 10, 3, 2])
    assert tail_rows(catalog, popularity, 0.5).tolist() == [False] * 3 + [True] * 5
    assert tail_rows(catalog, popularity, 0.8).tolist() == [False] * 5 + [True] * 3
    assert not tail_rows(catalog, popularity, 1.0).any()
    assert not tail_rows(catalog, np.zeros(8), 0.8).any()  # nothing to rank providers by
    with pytest.raises(ValueError, match="head_share"):
        tail_rows(catalog, popularity, 0.0)


def test_fair_minimums_are_the_binomial_quantiles() -> None:
    m = fair_minimums(20, 0.5, 0.1)
    assert m[0] == 0 and (np.diff(m) >= 0).all() and (np.diff(m) <= 1).all()
    for k in (5, 10, 20):
        # the fewest tail items a prefix may hold: fewer would reject "share 0.5" at 0.1
        assert binom.cdf(m[k], k, 0.5) >= 0.1 > binom.cdf(m[k] - 1, k, 0.5)
    assert fair_minimums(10, 0.0, 0.1).tolist() == [0] * 11
    assert fair_minimums(10, 1.0, 0.1).tolist() == list(range(11))
    with pytest.raises(ValueError, match="share"):
        fair_minimums(10, 1.5, 0.1)


def test_gini() -> None:
    assert gini(np.ones(7)) == pytest.approx(0.0)
    assert gini(np.zeros(3)) == 0.0
    assert gini(np.array([0, 0, 0, 5.0])) == pytest.approx(0.75)  # (n - 1) / n: one takes all
    assert gini(np.array([1.0, 3.0])) == pytest.approx(0.25)


def test_exposure_metrics_count_the_top_k_impressions() -> None:
    catalog = shop()
    providers, _ = provider_codes(catalog)
    tail = np.array([False] * 5 + [True] * 3)
    pages = [np.array([0, 1, 5, 7]), np.array([0, 3, -1, 2])]  # -1: not in the catalog
    m = exposure_metrics(pages, providers, tail, k=3)
    # impressions: rows 0, 1, 5 and 0, 3 -> a 3, c 1, b 1 over five providers
    assert m["impressions"] == 5
    assert m["tail_share"] == pytest.approx(1 / 5)
    assert m["item_coverage"] == pytest.approx(4 / 8)
    assert m["provider_coverage"] == pytest.approx(3 / 5)
    assert m["gini"] == pytest.approx(gini(np.array([3, 1, 1, 0, 0.0])))
    assert m["largest"][0] == (int(providers[0]), pytest.approx(0.6))
