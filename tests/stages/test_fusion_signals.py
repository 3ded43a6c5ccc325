"""The fine stage's signal fusion: its fit, its file, and when a request uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.coarse.engine import COLUMN, FeatureTables
from sluice.domain import Budget, Candidates, FineOverrides, RankContext
from sluice.fine.backend import TorchBackend
from sluice.fine.contract import BUILD_MODEL
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import SIGNALS, FusionWeights, fit_signals, fuse_signals


def _requests(seed: int, count: int, informative: int) -> list[tuple[np.ndarray, int]]:
    """Requests of 50 candidates whose target has the largest value of signal
    ``informative`` plus noise; every other signal is noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        m = rng.normal(size=(50, len(SIGNALS)))
        m[:, informative] += rng.normal(scale=0.5, size=50)
        out.append((m, int(np.argmax(m[:, informative]))))
    return out


def _top1(samples: list[tuple[np.ndarray, int]], weights: dict[str, float]) -> float:
    return float(np.mean([np.argmax(fuse_signals(m, weights)) == t for m, t in samples]))


def test_fit_finds_the_signal_that_picks_the_target() -> None:
    informative = SIGNALS.index("log_cooc")
    weights = fit_signals(_requests(0, 400, informative))
    assert max(weights, key=lambda k: abs(weights[k])) == "log_cooc"
    assert weights["log_cooc"] > 0
    held_out = _requests(1, 200, informative)
    # the fitted weights rank held-out targets first far more often than the model alone
    assert _top1(held_out, weights) > 0.5 > 0.1 > _top1(held_out, {"fine": 1.0})


def test_weights_round_trip_and_older_files_fuse_by_beta(tmp_path: Path) -> None:
    path = tmp_path / "fusion.json"
    fitted = FusionWeights(0.5, 1.0, {"fine": 0.7, "log_cooc": 0.2}, "fine_ranker:3")
    fitted.save(path)
    assert FusionWeights.load(path) == fitted
    path.write_text('{"recommend": 0.25, "search": 1.0}')  # written before signals existed
    assert FusionWeights.load(path) == FusionWeights(0.25, 1.0, {})
    with pytest.raises(ValueError, match="unknown"):
        FusionWeights(0.0, 0.0, {"price": 1.0})


def test_a_recommendation_is_ordered_by_the_signals(tiny_artifacts: Artifacts) -> None:
    a = tiny_artifacts
    tables = FeatureTables.from_artifacts(a, lexical=False)
    build_model = f"{BUILD_MODEL}:{a.ranker_version}"
    only_cooc = FusionWeights(0.0, 0.0, {"log_cooc": 1.0}, build_model)
    stage = FineEngine(a.catalog, TorchBackend(a.ranker_dir), only_cooc, tables=tables)
    _, histories = a.users()
    history = next(h for h in histories if len(h) >= 3)
    ctx = RankContext(history_item_ids=history, exclude_item_ids=history)
    ids = np.setdiff1d(a.catalog.item_ids[:200], history)
    cands = Candidates(ids, np.zeros(len(ids)), np.zeros(len(ids)))
    log_cooc = tables.features(ctx, cands)[:, COLUMN["log_cooc"]]
    assert log_cooc.max() > log_cooc.min()  # the history has co-occurrence evidence here

    ranked = stage.rank(ctx, cands, Budget(len(ids)))
    order = tables.features(ctx, ranked)[:, COLUMN["log_cooc"]]
    assert np.all(np.diff(order) <= 1e-6)  # by log_cooc alone, as the weights say

    # an experiment arm's beta, and a search, fuse the model's score by beta instead
    by_model = stage.rank(
        RankContext(history_item_ids=history, fine=FineOverrides(fusion_beta=0.0)),
        cands,
        Budget(len(ids)),
    )
    model = stage.model_scores(ctx, by_model)
    assert np.all(np.diff(model) <= 1e-5)
    assert not stage.fuses_signals(RankContext(query="shampoo", history_item_ids=history))
    assert not FineEngine(a.catalog, stage.backend, only_cooc).fuses_signals(ctx)
    # weights fitted beside another model (a brought one, an older version) are not applied
    for other in ("mlp_ranker:7", f"{BUILD_MODEL}:not-{a.ranker_version}"):
        elsewhere = FusionWeights(0.0, 0.0, {"log_cooc": 1.0}, other)
        assert not FineEngine(a.catalog, stage.backend, elsewhere, tables=tables).fuses_signals(ctx)
    assert stage.fuses_signals(ctx)
