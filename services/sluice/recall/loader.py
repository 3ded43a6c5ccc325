"""Loads the recall engine as every layout runs it: from the artifacts, warmed up.

Three kinds of recall process (:mod:`sluice.recall.shards`): the whole catalog (the
default), one shard of a sharded catalog (``shard``), or a front over the shards
(``shard_addrs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from sluice.artifacts import Artifacts
from sluice.builds import build_id_of
from sluice.config import RecallSettings
from sluice.data.updates import follow_updates, lexical_listener, serving_artifacts
from sluice.domain import Budget, RankContext, StageName
from sluice.recall.engine import RecallAssets, RecallEngine
from sluice.recall.live_popularity import BlendConfig, LivePopularity
from sluice.recall.shards import ShardedRecall, ShardEngine, ShardManifest, shard_assets
from sluice.state.store import RedisStateStore

log = logging.getLogger(__name__)


def load(settings: RecallSettings, closers: list[Callable[[], None]]) -> Any:
    """The engine, warmed up; what must be closed at shutdown goes to ``closers``."""
    if settings.shard_addrs or settings.shard is not None:
        artifacts = Artifacts(settings.artifacts)
    else:  # the whole catalog: it may take live updates
        artifacts = serving_artifacts(settings.artifacts, settings)
    if settings.shard_addrs:
        return load_front(settings, artifacts, closers)
    popularity = live_popularity(settings, artifacts)
    if popularity is not None:
        closers.append(popularity.close)
    if settings.shard is not None:
        assets = shard_assets(artifacts, settings.shard, popularity, settings.use_gpu)
        warm_up(RecallEngine(assets))
        return ShardEngine(RecallEngine(assets))
    assets = RecallAssets.from_artifacts(artifacts, popularity=popularity, use_gpu=settings.use_gpu)
    follow_updates(settings, artifacts, closers, lexical_listener(assets.lexical))
    return warm_up(RecallEngine(assets))


def warm_up(engine: RecallEngine) -> RecallEngine:
    some = engine.assets.catalog.item_ids[:5]
    engine.retrieve(RankContext(history_item_ids=some), Budget(100))
    engine.retrieve(RankContext(query=engine.assets.catalog.titles[0]), Budget(100))
    return engine


def load_front(
    settings: RecallSettings, artifacts: Artifacts, closers: list[Callable[[], None]]
) -> ShardedRecall:
    """The recall front over the build's shards: in this process (``shard_addrs=local``) or
    over gRPC, once every shard has the build loaded."""
    manifest = ShardManifest.load(artifacts.root)
    if not settings.shard_targets:
        popularity = live_popularity(settings, artifacts)
        if popularity is not None:
            closers.append(popularity.close)
        local = []
        for index in range(manifest.count):
            engine = RecallEngine(shard_assets(artifacts, index, popularity, settings.use_gpu))
            local.append(_local_shard(ShardEngine(warm_up(engine)), build_id_of(artifacts.root)))
        return ShardedRecall(local, manifest.num_items, closers=closers, parallel=False)
    return ShardedRecall(
        remote_shards(settings, manifest, build_id_of(artifacts.root), closers),
        manifest.num_items,
        closers=closers,
    )


def _local_shard(engine: ShardEngine, build_id: str) -> Any:
    from sluice.gateway.stages import LocalStage

    return LocalStage(StageName.RECALL, engine, build_id)


def remote_shards(
    settings: RecallSettings,
    manifest: ShardManifest,
    build_id: str,
    closers: list[Callable[[], None]],
) -> list[Any]:
    from sluice.core.auth import channel_credentials
    from sluice.gateway.stages import GrpcStage
    from sluice.recall.service import SHARD_BINDING

    targets = settings.shard_targets
    if len(targets) != manifest.count:
        raise ValueError(
            f"shard_addrs names {len(targets)} shards; the build {settings.artifacts} "
            f"has {manifest.count}"
        )
    tls = (
        channel_credentials(
            settings.shard_tls_ca_file, settings.shard_tls_cert_file, settings.shard_tls_key_file
        )
        if settings.shard_tls_ca_file
        else None
    )
    clients = []
    for target in targets:
        client = GrpcStage(SHARD_BINDING, target, tls, settings.shard_attempts)
        closers.append(client.close)
        clients.append(client)
    if build_id:  # answer only once every shard can answer from this build
        for client in clients:
            client.wait_for_build(build_id, settings.shard_wait_s)
    log.info("recall front over shards", extra={"shards": targets, "build_id": build_id})
    return clients


def live_popularity(settings: RecallSettings, artifacts: Artifacts) -> LivePopularity | None:
    """With a shared (Redis) state store: popularity that follows live events."""
    if settings.state != "redis":
        return None
    store = RedisStateStore.from_url(settings.redis_url)
    config = BlendConfig(
        max_live_weight=settings.live_popularity_weight,
        refresh_s=settings.live_popularity_refresh_s,
    )
    item_ids = np.load(artifacts.root / "catalog.npz")["item_ids"]  # not the catalog's text
    popularity = LivePopularity(artifacts.popularity, item_ids, store, config)
    popularity.start()
    log.info(
        "live popularity on",
        extra={"redis_url": settings.redis_url, "live_items": popularity.snapshot.live_items},
    )
    return popularity
