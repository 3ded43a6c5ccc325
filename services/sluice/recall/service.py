"""Recall gRPC service: converts protos, calls :class:`Recaller`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from sluice.artifacts import Artifacts
from sluice.config import RecallSettings
from sluice.convert import (
    candidates_to_proto,
    check_budget,
    context_from_stage_request,
    report_to_proto,
)
from sluice.core.errors import Unavailable
from sluice.core.server import ServiceSpec
from sluice.domain import RankContext, StageName, StageReport
from sluice.recall.engine import RecallAssets, Recaller
from sluice.recall.live_popularity import BlendConfig, LivePopularity
from sluice.recall.v1 import recall_pb2, recall_pb2_grpc
from sluice.state.store import RedisStateStore

log = logging.getLogger(__name__)


class RecallServicer(recall_pb2_grpc.RecallServiceServicer):
    def __init__(self, settings: RecallSettings) -> None:
        self.settings = settings
        self.recaller: Recaller | None = None

    def Recall(  # noqa: N802 - gRPC method name
        self, request: recall_pb2.RecallRequest, context: grpc.ServicerContext
    ) -> recall_pb2.RecallResponse:
        if self.recaller is None:
            raise Unavailable("recall is warming up")
        budget = check_budget(
            request.max_candidates, "max_candidates", self.settings.max_candidates
        )
        ctx = context_from_stage_request(request)
        t0 = time.perf_counter()
        result = self.recaller.recall(ctx, budget or 1000)
        report = StageReport(
            StageName.RECALL,
            candidates_in=len(self.recaller.assets.catalog),
            candidates_out=len(result.candidates),
            duration_us=int((time.perf_counter() - t0) * 1e6),
        )
        return recall_pb2.RecallResponse(
            candidates=candidates_to_proto(result.candidates),
            source_counts=result.source_counts,
            report=report_to_proto(report),
        )


def load_recaller(settings: RecallSettings, closers: list[Callable[[], None]]) -> Recaller:
    """Recall as the service runs it, warmed up; what must be closed goes to ``closers``."""
    artifacts = Artifacts(settings.artifacts)
    popularity = live_popularity(settings, artifacts)
    if popularity is not None:
        closers.append(popularity.close)
    assets = RecallAssets.from_artifacts(artifacts, popularity=popularity, use_gpu=settings.use_gpu)
    recaller = Recaller(assets)
    some = assets.catalog.item_ids[:5]
    recaller.recall(RankContext(history_item_ids=some), 100)
    recaller.recall(RankContext(query=assets.catalog.titles[0]), 100)
    return recaller


def spec(settings: RecallSettings) -> ServiceSpec:
    servicer = RecallServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        recall_pb2_grpc.add_RecallServiceServicer_to_server(servicer, server)
        return [recall_pb2.DESCRIPTOR.services_by_name["RecallService"].full_name]

    resources: list[Callable[[], None]] = []

    def warmup() -> None:
        servicer.recaller = load_recaller(settings, resources)

    def shutdown() -> None:
        for close in reversed(resources):
            close()

    return ServiceSpec("recall", register, warmup, shutdown)


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
