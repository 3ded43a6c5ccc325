"""Loads the re-ranking engine as every layout runs it: from the artifacts, warmed up."""

from __future__ import annotations

from collections.abc import Callable

from sluice.config import RerankSettings
from sluice.data.updates import follow_updates, serving_artifacts
from sluice.domain import Budget, Candidates, RankContext
from sluice.rerank.engine import RerankConfig, RerankEngine
from sluice.rerank.exposure import tail_rows


def load(settings: RerankSettings, closers: list[Callable[[], None]]) -> RerankEngine:
    """The engine, warmed up."""
    artifacts = serving_artifacts(settings.artifacts, settings)
    config = RerankConfig(
        settings.diversity_lambda,
        settings.max_per_brand,
        search_diversity_lambda=settings.search_diversity_lambda,
        tail_share=settings.exposure_tail_share,
        tail_alpha=settings.exposure_alpha,
    )
    # the long tail, for the exposure target of the settings or of an experiment arm
    tail = tail_rows(artifacts.catalog, artifacts.popularity, settings.exposure_head_share)
    engine = RerankEngine(artifacts.catalog, artifacts.text_vectors, config, tail)
    follow_updates(settings, artifacts, closers, lambda live, rows: engine.learn_titles(rows))
    ids = artifacts.catalog.item_ids[:30]
    engine.rank(RankContext(), Candidates(ids, ids * 1.0, ids * 0), Budget(10))
    return engine
