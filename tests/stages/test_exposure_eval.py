"""``sluice eval recommend --exposure`` and ``--arms`` on the generated shop: the replay is
the gateway's page, the exposure target moves impressions to the long tail, and two arms
get a paired difference with its interval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.domain import FineOverrides, RerankOverrides
from sluice.eval.arms import arms_section, paired_difference
from sluice.eval.exposure import exposure_section
from sluice.eval.replay import record_rerank_inputs, replay
from sluice.eval.served import RecommendSplit


def _split(artifacts: Artifacts) -> RecommendSplit:
    """The tiny build's users with a random unseen test item each."""
    catalog = artifacts.catalog
    ids, histories = artifacts.users()
    rows = [catalog.rows(h) for h in histories]
    rng = np.random.default_rng(0)
    test = np.array([int(rng.choice(np.setdiff1d(np.arange(len(catalog)), r))) for r in rows])
    return RecommendSplit(artifacts, ids, rows, np.full(len(ids), -1), test, rows)


def test_exposure_section_replays_the_gateway_and_moves_exposure(
    tiny_artifacts: Artifacts,
) -> None:
    split = _split(tiny_artifacts)
    ids = split.user_ids
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


def test_arms_replay_reports_a_paired_difference(tiny_artifacts: Artifacts, tmp_path: Path) -> None:
    split = _split(tiny_artifacts)
    spec = {
        "version": "v",
        "experiments": [
            {
                "name": "mmr",
                "salt": "s",
                "arms": [
                    {"name": "control"},
                    {"name": "same"},
                    {"name": "tail", "settings": {"exposure_tail_share": 1.0}},
                ],
            }
        ],
    }
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(spec))
    users = np.arange(0, len(split.user_ids), len(split.user_ids) // 60)
    same = arms_section(split, users, path)  # the first two arms: control against control
    assert same["difference"]["NDCG@10"] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    report = arms_section(split, users, path, "mmr", ("control", "tail"))
    for arm in ("control", "tail"):
        assert report["arms"][arm]["metrics"]["HR@10"] >= 0.0
    for metric in ("HR@10", "NDCG@10"):
        d = report["difference"][metric]
        assert d["low"] <= d["difference"] <= d["high"]
        control = report["arms"]["control"]["metrics"][metric]
        tail = report["arms"]["tail"]["metrics"][metric]
        # the per-user figures the bootstrap reads agree with the shared metric code
        assert d["difference"] == pytest.approx(tail - control, abs=1e-9)
    with pytest.raises(ValueError, match="arms"):
        arms_section(split, users, path, "mmr", ("control", "missing"))


def test_a_fusion_arm_replays_the_fine_stage(tiny_artifacts: Artifacts) -> None:
    """Fine ranking runs again on its recorded input: with the build's own fusion (here its
    signal weights) it gives the served pages back; an arm's fusion_beta replaces the
    signals, the build's own beta and the ranker alone (beta 0) both change some pages."""
    split = _split(tiny_artifacts)
    users = np.arange(0, len(split.user_ids), len(split.user_ids) // 40)
    recorded = record_rerank_inputs(split, users)
    fusion = recorded.fine_engine.fusion
    assert fusion.signals and fusion.beta(False) != 0.0  # else the checks below could not fail
    same = replay(split, recorded, RerankOverrides(), fine=FineOverrides())
    assert all(np.array_equal(a, b) for a, b in zip(same, recorded.pages, strict=True))
    for beta in (fusion.beta(False), 0.0):
        arm = replay(split, recorded, RerankOverrides(), fine=FineOverrides(beta))
        assert any(not np.array_equal(a, b) for a, b in zip(arm, recorded.pages, strict=True))


def test_paired_difference() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(500)
    assert paired_difference(a, a) == {"difference": 0.0, "low": 0.0, "high": 0.0}
    d = paired_difference(a, a + 0.1 + rng.normal(0, 0.01, 500))
    assert 0.09 < d["low"] < d["difference"] < d["high"] < 0.11
    noise = paired_difference(a, rng.permutation(a))  # no real difference: 0 is inside
    assert noise["low"] < 0 < noise["high"]
