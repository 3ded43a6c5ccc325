"""Loads the re-ranking engine as every layout runs it: from the artifacts, warmed up."""

from __future__ import annotations

from collections.abc import Callable

from sluice.artifacts import Artifacts
from sluice.config import RerankSettings
from sluice.domain import Budget, Candidates, RankContext
from sluice.rerank.engine import RerankConfig, RerankEngine
from sluice.rerank.exposure import tail_rows


def load(settings: RerankSettings, closers: list[Callable[[], None]]) -> RerankEngine:
    """The engine, warmed up."""
    artifacts = Artifacts(settings.artifacts)
    config = RerankConfig(
        settings.diversity_lambda,
        settings.max_per_brand,
        tail_share=settings.exposure_tail_share,
        tail_alpha=settings.exposure_alpha,
    )
    # the long tail, for the exposure target of the settings or of an experiment arm
    tail = tail_rows(artifacts.catalog, artifacts.popularity, settings.exposure_head_share)
    engine = RerankEngine(artifacts.catalog, artifacts.text_vectors, config, tail)
    ids = artifacts.catalog.item_ids[:30]
    engine.rank(RankContext(), Candidates(ids, ids * 1.0, ids * 0), Budget(10))
    return engine
