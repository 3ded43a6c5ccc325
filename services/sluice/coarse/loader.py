"""Loads the coarse engine as every layout runs it: from the artifacts, warmed up."""

from __future__ import annotations

from collections.abc import Callable

from sluice.artifacts import Artifacts
from sluice.coarse.engine import CoarseEngine, FeatureTables, LinearWeights
from sluice.config import CoarseSettings
from sluice.domain import Budget, Candidates, RankContext


def load(settings: CoarseSettings, closers: list[Callable[[], None]]) -> CoarseEngine:
    """The engine, warmed up. Artifacts without fitted weights get the hand-set defaults."""
    artifacts = Artifacts(settings.artifacts)
    weights_path = artifacts.root / "coarse.json"
    weights = LinearWeights.load(weights_path) if weights_path.exists() else LinearWeights.default()
    engine = CoarseEngine(FeatureTables.from_artifacts(artifacts), weights)
    ids = artifacts.catalog.item_ids[:50]
    engine.rank(
        RankContext(history_item_ids=ids[:3]), Candidates(ids, ids * 0.0, ids * 0), Budget(10)
    )
    return engine
