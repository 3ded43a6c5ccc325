"""Loads the recall engine as every layout runs it: from the artifacts, warmed up."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sluice.artifacts import Artifacts
from sluice.config import RecallSettings
from sluice.domain import Budget, RankContext
from sluice.recall.engine import RecallAssets, RecallEngine
from sluice.recall.live_popularity import BlendConfig, LivePopularity
from sluice.state.store import RedisStateStore

log = logging.getLogger(__name__)


def load(settings: RecallSettings, closers: list[Callable[[], None]]) -> RecallEngine:
    """The engine, warmed up; what must be closed at shutdown goes to ``closers``."""
    artifacts = Artifacts(settings.artifacts)
    popularity = live_popularity(settings, artifacts)
    if popularity is not None:
        closers.append(popularity.close)
    assets = RecallAssets.from_artifacts(artifacts, popularity=popularity, use_gpu=settings.use_gpu)
    engine = RecallEngine(assets)
    some = assets.catalog.item_ids[:5]
    engine.retrieve(RankContext(history_item_ids=some), Budget(100))
    engine.retrieve(RankContext(query=assets.catalog.titles[0]), Budget(100))
    return engine


def live_popularity(settings: RecallSettings, artifacts: Artifacts) -> LivePopularity | None:
    """With a shared (Redis) state store: popularity that follows live events."""
    if settings.state != "redis":
        return None
    store = RedisStateStore.from_url(settings.redis_url)
    config = BlendConfig(
        max_live_weight=settings.live_popularity_weight,
        refresh_s=settings.live_popularity_refresh_s,
    )
    popularity = LivePopularity(artifacts.popularity, artifacts.catalog.item_ids, store, config)
    popularity.start()
    log.info(
        "live popularity on",
        extra={"redis_url": settings.redis_url, "live_items": popularity.snapshot.live_items},
    )
    return popularity
