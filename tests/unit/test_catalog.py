"""Catalog.rows: external item ids to rows, with and without the dense id table."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.data.catalog import Catalog


@pytest.mark.parametrize("spread", [1, 3, 10_000])  # compact ids use the table; sparse ones not
def test_rows_agree_with_a_dict_lookup(spread: int) -> None:
    rng = np.random.default_rng(spread)
    ids = rng.choice(500 * spread, size=500, replace=False).astype(np.int64)
    catalog = Catalog.from_columns(ids.tolist(), [f"item {i}" for i in ids])
    assert (catalog.index._dense_rows is not None) == (spread < 4)
    row_of = {int(i): r for r, i in enumerate(ids)}
    queries = np.concatenate(
        [ids, rng.integers(-5, 500 * spread + 50, 2000), [np.iinfo(np.int64).max, -1]]
    )
    expected = [row_of.get(int(q), -1) for q in queries]
    got = catalog.rows(queries)
    assert got.dtype == np.int64
    assert got.tolist() == expected
    assert catalog.rows(np.zeros(0, np.int64)).shape == (0,)
