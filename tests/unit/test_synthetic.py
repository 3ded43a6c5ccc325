"""The embedded default shop: seeded, and its behaviour sampler draws the intended distribution."""

from __future__ import annotations

import numpy as np

from sluice.data.synthetic import ShopSpec, _ItemSampler, generate_shop


def test_same_spec_gives_the_same_shop() -> None:
    spec = ShopSpec(num_items=400, num_users=60, seed=3)
    (c1, i1), (c2, i2) = generate_shop(spec), generate_shop(spec)
    assert c1.titles == c2.titles
    assert np.array_equal(i1.item_rows, i2.item_rows)
    assert np.array_equal(i1.timestamps, i2.timestamps)
    other = generate_shop(ShopSpec(num_items=400, num_users=60, seed=4))[1]
    assert not np.array_equal(i1.item_rows[:50], other.item_rows[:50])


def test_every_user_has_time_ordered_events_over_valid_items() -> None:
    catalog, log = generate_shop(ShopSpec(num_items=300, num_users=40, seed=1))
    assert set(np.unique(log.user_index).tolist()) == set(range(40))
    assert log.item_rows.min() >= 0 and log.item_rows.max() < len(catalog.titles)
    for u in range(40):
        stamps = log.timestamps[log.user_index == u]
        assert len(stamps) >= 5
        assert np.all(np.diff(stamps) >= 0)


def test_item_sampler_matches_the_direct_weighted_draw() -> None:
    """Brand-then-item with rejection of seen items == one draw over the whole category."""
    rng = np.random.default_rng(0)
    n_items, n_brands = 60, 5
    item_cat = np.zeros(n_items, dtype=np.int64)  # one category
    item_brand = rng.integers(n_brands, size=n_items)
    quality = rng.pareto(1.6, size=n_items) + 1.0
    boost = 1.0 + 30.0 * rng.dirichlet(np.full(n_brands, 0.2))
    seen = {int(i) for i in rng.choice(n_items, 10, replace=False)}

    expected = quality * boost[item_brand]
    expected[list(seen)] *= _ItemSampler.SEEN_ACCEPT
    expected /= expected.sum()

    sampler = _ItemSampler(item_cat, item_brand, quality, n_cat=1)
    draws = 200_000
    counts = np.bincount(
        [sampler.draw(rng, 0, boost, seen) for _ in range(draws)], minlength=n_items
    )
    observed = counts / draws
    # 5 standard errors of a binomial share: fails on a wrong distribution, not on noise
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-4
    assert np.all(np.abs(observed - expected) <= tolerance), np.abs(observed - expected).max()
