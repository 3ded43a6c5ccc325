"""The storefront-facing gateway: Search, Recommend and Track over gRPC."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge

from sluice.artifacts import Artifacts
from sluice.config import GatewaySettings
from sluice.convert import filters_from_proto, item_filters_from_proto, report_to_proto
from sluice.core.auth import channel_credentials
from sluice.core.errors import InvalidArgument, Unavailable
from sluice.core.server import ServiceSpec, caller_timeout_s
from sluice.data.filters import AttributeFilter
from sluice.domain import Cancellation, StageName
from sluice.events.ingest import Ingestor
from sluice.events.log import EventLog
from sluice.events.metrics import EventMetrics
from sluice.events.model import Event
from sluice.gateway.fallback import FallbackRecall
from sluice.gateway.pipeline import (
    MAX_PAGE_OFFSET,
    Gateway,
    GatewayLimits,
    PageResult,
    QueryEncoder,
)
from sluice.gateway.stages import GrpcStage, LocalStage, StageClient
from sluice.gateway.tokens import PageTokens
from sluice.gateway.users import UserHistory, item_attributes
from sluice.state.store import InMemoryStateStore, OnlineStateStore, RedisStateStore
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from sluice.wiring import STAGES, load_engines

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


def cancellation_of(context: grpc.ServicerContext) -> Cancellation:
    """Set when the call ends before its handler does: the client cancelled or left."""
    cancellation = Cancellation()
    context.add_callback(cancellation.cancel)
    return cancellation


def page_response(result: PageResult) -> dict[str, Any]:
    """The fields SearchResponse and RecommendResponse share."""
    return {
        "page": page_to_proto(result),
        "next_page_token": result.next_page_token,
        "stages": [report_to_proto(r) for r in result.reports],
        "duration_us": result.duration_us,
    }


def request_filters(
    request: storefront_pb2.SearchRequest | storefront_pb2.RecommendRequest,
) -> tuple[AttributeFilter, ...]:
    """Both filter forms of a storefront request, validated; every one applies."""
    return filters_from_proto(request.filters) + item_filters_from_proto(request.item_filters)


class StorefrontServicer(storefront_pb2_grpc.StorefrontServiceServicer):
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.gateway: Gateway | None = None
        self.ingestor: Ingestor | None = None

    def _ready(self) -> Gateway:
        if self.gateway is None:
            raise Unavailable("gateway is warming up")
        return self.gateway

    def _ingesting(self) -> Ingestor:
        if self.ingestor is None:
            raise Unavailable("event ingestion is warming up")
        return self.ingestor

    def Search(  # noqa: N802
        self, request: storefront_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.SearchResponse:
        result = self._ready().search(
            query=request.query,
            user_id=request.user_id,
            filters=request_filters(request),
            page_size=request.page_size,
            page_token=request.page_token,
            deadline_s=caller_timeout_s(context),
            cancellation=cancellation_of(context),
        )
        return storefront_pb2.SearchResponse(**page_response(result))

    def Recommend(  # noqa: N802
        self, request: storefront_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.RecommendResponse:
        result = self._ready().recommend(
            user_id=request.user_id,
            surface=request.surface,
            context_item_id=request.context_item_id,
            filters=request_filters(request),
            page_size=request.page_size,
            page_token=request.page_token,
            deadline_s=caller_timeout_s(context),
            cancellation=cancellation_of(context),
        )
        return storefront_pb2.RecommendResponse(**page_response(result))

    def DeleteUser(  # noqa: N802
        self, request: storefront_pb2.DeleteUserRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.DeleteUserResponse:
        erased = self._ingesting().delete_user(request.user_id)
        log.info("user erased", extra={"erased_events": erased})
        return storefront_pb2.DeleteUserResponse(erased_events=erased)

    def Track(  # noqa: N802
        self, request: storefront_pb2.TrackRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.TrackResponse:
        ingestor = self._ingesting()
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
        results = ingestor.track(events)
        IN_FLIGHT.set(ingestor.in_flight)
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
) -> dict[StageName, StageClient]:
    """The four stages: their services over gRPC, or (``stages=local``) their engines loaded
    into this process through the same wiring their services use, from the same artifacts."""
    if settings.stages == "grpc":
        tls = (
            channel_credentials(
                settings.stage_tls_ca_file,
                settings.stage_tls_cert_file,
                settings.stage_tls_key_file,
            )
            if settings.stage_tls_ca_file
            else None
        )
        remote = [GrpcStage(e.binding(), getattr(settings, f"{e.name}_addr"), tls) for e in STAGES]
        # connect now, so that the first requests after a (re)start do not pay for it; a stage
        # that is down is not waited for: its calls degrade until it is back
        for client in remote:
            closers.append(client.close)
            with contextlib.suppress(grpc.FutureTimeoutError):
                grpc.channel_ready_future(client.channel).result(timeout=1.0)
        return {client.stage: client for client in remote}
    shared_state = {"state": settings.state, "redis_url": settings.redis_url}
    engines = load_engines(settings.artifacts, closers, {"recall": shared_state})
    return {stage: LocalStage(stage, engine) for stage, engine in engines.items()}


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
            PageTokens.from_settings(
                [k.get_secret_value() for k in settings.page_token_keys], MAX_PAGE_OFFSET
            ),
            # with the stages in this process recall cannot be down on its own
            FallbackRecall.from_artifacts(artifacts) if settings.stages == "grpc" else None,
        )
        collector = EventMetrics(event_log, ingestor)
        REGISTRY.register(collector)
        resources.append(lambda: REGISTRY.unregister(collector))
        gateway.encode_query("warm up")
        servicer.gateway = gateway
        servicer.ingestor = ingestor

    def shutdown() -> None:
        for close in reversed(resources):
            close()

    # Track has its own back-pressure (events in flight); DeleteUser is rare
    return ServiceSpec(
        "gateway", register, warmup, shutdown, admitted_methods=frozenset({"Search", "Recommend"})
    )
