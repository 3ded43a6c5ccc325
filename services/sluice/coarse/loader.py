"""Loads the coarse engine as every layout runs it: from the artifacts, warmed up."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sluice.coarse.engine import CoarseEngine, FeatureTables, LinearWeights
from sluice.config import CoarseSettings
from sluice.data.updates import LiveCatalog, follow_updates, lexical_listener, serving_artifacts
from sluice.domain import Budget, Candidates, RankContext


def load(settings: CoarseSettings, closers: list[Callable[[], None]]) -> CoarseEngine:
    """The engine, warmed up. Artifacts without fitted weights get the hand-set defaults."""
    artifacts = serving_artifacts(settings.artifacts, settings)
    weights_path = artifacts.root / "coarse.json"
    weights = LinearWeights.load(weights_path) if weights_path.exists() else LinearWeights.default()
    tables = FeatureTables.from_artifacts(artifacts)
    fields = tables.fields  # built now, not on the first search

    def index_fields(live: LiveCatalog, rows: np.ndarray) -> None:
        cat = live.catalog
        fields.add(
            rows.tolist(),
            [cat.titles[r] for r in rows.tolist()],
            [cat.descriptions[r] if cat.descriptions else "" for r in rows.tolist()],
        )

    follow_updates(settings, artifacts, closers, lexical_listener(tables.lexical), index_fields)
    engine = CoarseEngine(tables, weights)
    ids = artifacts.catalog.item_ids[:50]
    # a recommendation and a search, so that every kernel they use is loaded before SERVING
    for ctx in (
        RankContext(history_item_ids=ids[:3]),
        RankContext(query=artifacts.catalog.titles[0]),
    ):
        engine.rank(ctx, Candidates(ids, ids * 0.0, ids * 0), Budget(10))
    return engine
