"""``sluice eval recommend --exposure`` on the generated shop: the replay is the gateway's
page, and the exposure target moves impressions to the long tail."""

from __future__ import annotations

import numpy as np

from sluice.artifacts import Artifacts
from sluice.eval.exposure import exposure_section
from sluice.eval.served import RecommendSplit


def test_exposure_section_replays_the_gateway_and_moves_exposure(
    tiny_artifacts: Artifacts,
) -> None:
    catalog = tiny_artifacts.catalog
    ids, histories = tiny_artifacts.users()
    rows = [catalog.rows(h) for h in histories]
    rng = np.random.default_rng(0)
    test = np.array([int(rng.choice(np.setdiff1d(np.arange(len(catalog)), r))) for r in rows])
    split = RecommendSplit(tiny_artifacts, ids, rows, np.full(len(ids), -1), test, rows)
    users = np.arange(0, len(ids), len(ids) // 40)
    report = exposure_section(split, users)
    variants = report["variants"]
    deployed, relevance = variants["as deployed"], variants["relevance only (no MMR, no brand cap)"]
    assert deployed["same_as_gateway"] == len(users)
    assert "brand cap 1" in variants  # the generated shop has brands
    assert 0 < report["tail_providers"] < report["providers"]
    for v in variants.values():
        assert 0.0 <= v["gini"] <= 1.0 and v["impressions"] == 10 * len(users)
    # the exposure target raises the long tail's share, and the stricter, the higher
    shares = [variants[f"tail share {p:.1f}"]["tail_share"] for p in (0.2, 0.6, 1.0)]
    assert shares == sorted(shares) and shares[-1] > deployed["tail_share"]
    # a cap of one item per brand shows more of the providers
    assert variants["brand cap 1"]["provider_coverage"] > relevance["provider_coverage"]
