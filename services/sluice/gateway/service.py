"""The storefront-facing gateway: Search, Recommend and Track over gRPC."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from prometheus_client import Counter, Gauge

from sluice.artifacts import Artifacts
from sluice.config import GatewaySettings
from sluice.convert import filters_from_proto, report_to_proto
from sluice.core.errors import InvalidArgument, Unavailable
from sluice.core.server import ServiceSpec
from sluice.domain import StageName
from sluice.events.ingest import Ingestor
from sluice.events.log import EventLog
from sluice.events.model import Event
from sluice.gateway.pipeline import Gateway, GatewayLimits, PageResult, QueryEncoder
from sluice.gateway.stages import GrpcStages, LocalStages
from sluice.gateway.users import UserHistory, item_attributes
from sluice.state.store import InMemoryStateStore, OnlineStateStore, RedisStateStore
from sluice.v1 import storefront_pb2, storefront_pb2_grpc

log = logging.getLogger(__name__)

EVENTS = Counter("sluice_track_events_total", "Track events by outcome", ["status"])
IN_FLIGHT = Gauge("sluice_track_in_flight_events", "Events accepted but not yet durable")


def page_to_proto(result: PageResult) -> storefront_pb2.RankedPage:
    def stage(name: StageName) -> list[float]:
        values = result.stage_scores.get(name)
        return values.tolist() if values is not None else []

    return storefront_pb2.RankedPage(
        item_ids=result.candidates.item_ids.tolist(),
        scores=result.candidates.scores.tolist(),
        titles=result.titles,
        recall_scores=stage(StageName.RECALL),
        coarse_scores=stage(StageName.COARSE_RANK),
        fine_scores=stage(StageName.FINE_RANK),
        sources=result.candidates.sources.tolist(),
    )


class StorefrontServicer(storefront_pb2_grpc.StorefrontServiceServicer):
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.gateway: Gateway | None = None
        self.ingestor: Ingestor | None = None

    def _ready(self) -> Gateway:
        if self.gateway is None:
            raise Unavailable("gateway is warming up")
        return self.gateway

    def Search(  # noqa: N802
        self, request: storefront_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.SearchResponse:
        result = self._ready().search(
            request.query,
            request.user_id,
            filters_from_proto(request.filters),
            request.page_size,
            request.page_token,
            context.time_remaining(),
        )
        return storefront_pb2.SearchResponse(
            page=page_to_proto(result),
            next_page_token=result.next_page_token,
            stages=[report_to_proto(r) for r in result.reports],
            duration_us=result.duration_us,
        )

    def Recommend(  # noqa: N802
        self, request: storefront_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.RecommendResponse:
        result = self._ready().recommend(
            request.user_id,
            int(request.surface),
            request.context_item_id,
            filters_from_proto(request.filters),
            request.page_size,
            request.page_token,
            context.time_remaining(),
        )
        return storefront_pb2.RecommendResponse(
            page=page_to_proto(result),
            next_page_token=result.next_page_token,
            stages=[report_to_proto(r) for r in result.reports],
            duration_us=result.duration_us,
        )

    def Track(  # noqa: N802
        self, request: storefront_pb2.TrackRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.TrackResponse:
        if self.ingestor is None:
            raise Unavailable("event ingestion is warming up")
        if len(request.events) == 0:
            raise InvalidArgument("at least one event is required", field_path="events")
        if len(request.events) > self.settings.max_track_events:
            raise InvalidArgument(
                f"at most {self.settings.max_track_events} events per call", field_path="events"
            )
        events = [
            Event.from_wire(e.event_id, e.user_id, e.item_id, int(e.type), e.timestamp_ms, e.query)
            for e in request.events
        ]
        results = self.ingestor.track(events)
        IN_FLIGHT.set(self.ingestor.in_flight)
        for r in results:
            EVENTS.labels(r.status.name.lower()).inc()
        return storefront_pb2.TrackResponse(
            statuses=[storefront_pb2.EventStatus.Name(r.status) for r in results],
            errors=[r.error for r in results],
        )


def make_store(
    settings: GatewaySettings, attributes: Callable[[int], tuple[str, str] | None]
) -> OnlineStateStore:
    if settings.state == "redis":
        return RedisStateStore.from_url(settings.redis_url, attributes)
    return InMemoryStateStore(attributes)


def make_stages(
    settings: GatewaySettings, closers: list[Callable[[], None]]
) -> GrpcStages | LocalStages:
    """The four stages: their services over gRPC, or (``stages=local``) their logic loaded into
    this process exactly as each service loads it, from the same artifacts."""
    if settings.stages == "grpc":
        grpc_stages = GrpcStages(
            settings.recall_addr, settings.coarse_addr, settings.fine_addr, settings.rerank_addr
        )
        closers.append(grpc_stages.close)
        return grpc_stages
    from sluice.coarse.service import load_coarse_ranker
    from sluice.config import CoarseSettings, FineSettings, RecallSettings, RerankSettings
    from sluice.fine.service import load_fine_stage
    from sluice.recall.service import load_recaller
    from sluice.rerank.service import load_reranker

    art = settings.artifacts
    recall_settings = RecallSettings(
        artifacts=art, state=settings.state, redis_url=settings.redis_url
    )
    return LocalStages(
        load_recaller(recall_settings, closers),
        load_coarse_ranker(CoarseSettings(artifacts=art)),
        load_fine_stage(FineSettings(artifacts=art)),
        load_reranker(RerankSettings(artifacts=art)),
    )


def spec(settings: GatewaySettings) -> ServiceSpec:
    servicer = StorefrontServicer(settings)
    resources: list[Callable[[], None]] = []

    def register(server: grpc.Server) -> list[str]:
        storefront_pb2_grpc.add_StorefrontServiceServicer_to_server(servicer, server)
        return [storefront_pb2.DESCRIPTOR.services_by_name["StorefrontService"].full_name]

    def warmup() -> None:
        from sluice.embed.onnx import query_encoder

        artifacts = Artifacts(settings.artifacts)
        catalog = artifacts.catalog
        store = make_store(settings, item_attributes(catalog))
        event_log = EventLog(settings.event_log_dir)
        ingestor = Ingestor(
            event_log,
            store,
            known_item=catalog.contains,
            max_in_flight=settings.track_max_in_flight,
        )
        recovered = ingestor.recover()
        log.info("event log replayed", extra={"events": recovered})
        resources.extend([event_log.close, store.close])
        encoder = query_encoder(settings.artifacts, threads=settings.torch_threads)
        stages = make_stages(settings, resources)
        limits = GatewayLimits.from_settings(settings)
        gateway = Gateway(
            stages,
            catalog,
            UserHistory.from_artifacts(artifacts, store),
            QueryEncoder(encoder.encode),
            limits,
        )
        gateway.encode_query("warm up")
        servicer.gateway = gateway
        servicer.ingestor = ingestor

    def shutdown() -> None:
        for close in reversed(resources):
            close()

    return ServiceSpec("gateway", register, warmup, shutdown)
