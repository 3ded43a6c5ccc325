"""The storefront-facing gateway: Search, Recommend and Track over gRPC."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge

from sluice.artifacts import Artifacts
from sluice.builds import LoadedBuilds, build_id_of, resolve
from sluice.config import GatewaySettings
from sluice.convert import (
    filters_from_proto,
    item_filters_from_proto,
    item_filters_to_proto,
    report_to_proto,
)
from sluice.core.auth import channel_credentials
from sluice.core.errors import InvalidArgument, SluiceError, Unavailable
from sluice.core.server import ServiceSpec, caller_timeout_s
from sluice.data.filters import AttributeFilter
from sluice.data.updates import LiveCatalog, feed_for, follow_updates, serving_artifacts
from sluice.domain import Cancellation, StageName
from sluice.events.ingest import DurableLog, Ingestor
from sluice.events.log import EventLog
from sluice.events.metrics import TRACK_ACK_SECONDS, EventMetrics
from sluice.events.model import Event, EventStatus, EventType
from sluice.events.stream import RedisEventStream, StreamConfig, durability_warnings
from sluice.experiments import EVENTS as EXPERIMENT_EVENTS
from sluice.experiments import ExperimentsWatcher
from sluice.gateway.blurbs import Blurbs, ExtractiveBlurbs, GeneratedBlurbs
from sluice.gateway.catalog import CatalogServicer, CatalogWriter
from sluice.gateway.explain import Explainer
from sluice.gateway.fallback import FallbackRecall
from sluice.gateway.pipeline import (
    MAX_PAGE_OFFSET,
    Gateway,
    GatewayLimits,
    PageResult,
    QueryEncoder,
)
from sluice.gateway.refine import Refiner, Sessions, Turn
from sluice.gateway.shadow import ShadowArms
from sluice.gateway.spelling import speller_for
from sluice.gateway.stages import GrpcStage, LocalStage, StageClient
from sluice.gateway.tokens import PageTokens
from sluice.gateway.users import CatalogAttributes, UserHistory
from sluice.rules import RulesWatcher
from sluice.state.store import Attributes, InMemoryStateStore, OnlineStateStore, RedisStateStore
from sluice.v1 import catalog_pb2, catalog_pb2_grpc, storefront_pb2, storefront_pb2_grpc
from sluice.wiring import STAGES, load_engines, serve_builds

log = logging.getLogger(__name__)

EVENTS = Counter("sluice_track_events_total", "Track events by outcome", ["status"])
IN_FLIGHT = Gauge("sluice_track_in_flight_events", "Events accepted but not yet durable")


def page_to_proto(result: PageResult, view: int = 0) -> storefront_pb2.RankedPage:
    """The page as ``view`` shows it: the v1 page (unset), BASIC (no internals, reasons) or
    DEBUG (both)."""
    page = storefront_pb2.RankedPage(
        item_ids=result.candidates.item_ids.tolist(),
        scores=result.candidates.scores.tolist(),
        titles=result.titles,
    )
    if view != storefront_pb2.PAGE_VIEW_BASIC:
        for name, target in (
            (StageName.RECALL, page.recall_scores),
            (StageName.COARSE_RANK, page.coarse_scores),
            (StageName.FINE_RANK, page.fine_scores),
        ):
            values = result.stage_scores.get(name)
            if values is not None:
                target.extend(values.tolist())
        page.sources.extend(result.candidates.sources.tolist())
    if view != storefront_pb2.PAGE_VIEW_UNSPECIFIED:
        page.reasons.extend(
            storefront_pb2.ItemReason(
                code=storefront_pb2.ReasonCode.Name(int(r.code)),
                evidence_item_ids=r.evidence_item_ids,
                matched_terms=r.matched_terms,
                category=r.category,
            )
            for r in result.reasons
        )
    page.blurbs.extend(result.blurbs)
    return page


def page_view(view: int) -> int:
    """The request's view, checked: INVALID_ARGUMENT for a number the API does not name."""
    if view not in storefront_pb2.PageView.values():
        raise InvalidArgument(f"unknown page view {view}", field_path="view")
    return view


def cancellation_of(context: grpc.ServicerContext) -> Cancellation:
    """Set when the call ends before its handler does: the client cancelled or left."""
    cancellation = Cancellation()
    context.add_callback(cancellation.cancel)
    return cancellation


def page_response(result: PageResult, view: int) -> dict[str, Any]:
    """The fields SearchResponse and RecommendResponse share."""
    return {
        "page": page_to_proto(result, view),
        "next_page_token": result.next_page_token,
        "stages": [report_to_proto(r) for r in result.reports],
        "duration_us": result.duration_us,
        "build_id": result.build_id,
        "rules_version": result.rules_version,
        "experiment_arms": [
            storefront_pb2.ExperimentArm(experiment=e, arm=a) for e, a in result.experiment_arms
        ],
        "experiments_version": result.experiments_version,
    }


def refinement_to_proto(turn: Turn | None) -> storefront_pb2.SearchRefinement | None:
    if turn is None:
        return None
    return storefront_pb2.SearchRefinement(
        query=turn.query,
        item_filters=item_filters_to_proto(turn.filters),
        anchor_item_id=turn.anchor_item_id,
        applied=turn.applied,
        turn=turn.turn,
    )


def blurbs_for(
    settings: GatewaySettings, artifacts: Artifacts, encode: Callable[[Any], Any]
) -> Blurbs:
    """Extractive blurbs with the build's MiniLM encoder; generated ones over them when the
    settings name a text-generation server."""
    extractive = ExtractiveBlurbs(artifacts.catalog, artifacts.text_vectors, encode)
    if not settings.blurb_generator_url:
        return extractive
    return GeneratedBlurbs(
        artifacts.catalog,
        extractive,
        settings.blurb_generator_url,
        settings.blurb_generator_model,
        settings.blurb_generator_api_key.get_secret_value(),
        settings.blurb_generator_timeout_s,
    )


def request_filters(
    request: storefront_pb2.SearchRequest | storefront_pb2.RecommendRequest,
) -> tuple[AttributeFilter, ...]:
    """Both filter forms of a storefront request, validated; every one applies."""
    return filters_from_proto(request.filters) + item_filters_from_proto(request.item_filters)


class StorefrontServicer(storefront_pb2_grpc.StorefrontServiceServicer):
    def __init__(self, settings: GatewaySettings, builds: LoadedBuilds[Gateway]) -> None:
        self.settings = settings
        self.builds = builds
        self.ingestor: Ingestor | None = None

    def _ready(self) -> Gateway:
        """The current build's gateway: one request runs on it from start to end."""
        return self.builds.get()[1]

    def _ingesting(self) -> Ingestor:
        if self.ingestor is None:
            raise Unavailable("event ingestion is warming up")
        return self.ingestor

    def Search(  # noqa: N802
        self, request: storefront_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.SearchResponse:
        view = page_view(request.view)
        result = self._ready().search(
            query=request.query,
            user_id=request.user_id,
            filters=request_filters(request),
            page_size=request.page_size,
            page_token=request.page_token,
            deadline_s=caller_timeout_s(context),
            cancellation=cancellation_of(context),
            include_age_restricted=request.include_age_restricted,
            explain=view != storefront_pb2.PAGE_VIEW_UNSPECIFIED,
            blurbs=request.include_blurbs,
            session_id=request.session_id,
        )
        return storefront_pb2.SearchResponse(
            **page_response(result, view),
            searched_query=result.searched_query,
            query_blocked=result.query_blocked,
            refinement=refinement_to_proto(result.refinement),
        )

    def Recommend(  # noqa: N802
        self, request: storefront_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.RecommendResponse:
        view = page_view(request.view)
        result = self._ready().recommend(
            user_id=request.user_id,
            surface=request.surface,
            context_item_id=request.context_item_id,
            filters=request_filters(request),
            page_size=request.page_size,
            page_token=request.page_token,
            deadline_s=caller_timeout_s(context),
            cancellation=cancellation_of(context),
            include_age_restricted=request.include_age_restricted,
            explain=view != storefront_pb2.PAGE_VIEW_UNSPECIFIED,
            blurbs=request.include_blurbs,
        )
        return storefront_pb2.RecommendResponse(**page_response(result, view))

    def DeleteUser(  # noqa: N802
        self, request: storefront_pb2.DeleteUserRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.DeleteUserResponse:
        erased = self._ingesting().delete_user(request.user_id)
        log.info("user erased", extra={"erased_events": erased})
        return storefront_pb2.DeleteUserResponse(erased_events=erased)

    def Track(  # noqa: N802
        self, request: storefront_pb2.TrackRequest, context: grpc.ServicerContext
    ) -> storefront_pb2.TrackResponse:
        received = time.perf_counter()
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
        experiments = self._ready().experiments
        labels: dict[str, str] = {}
        if experiments is not None:  # each event carries its user's arms into the log
            current = experiments.current
            for user in {e.user_id for e in events}:
                labels[user] = current.label(user)
            events = [dataclasses.replace(e, arms=labels[e.user_id]) for e in events]
        results = ingestor.track(events)
        IN_FLIGHT.set(ingestor.in_flight)
        counts: dict[EventStatus, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        for status, count in counts.items():
            EVENTS.labels(status.name.lower()).inc(count)
        for event, r in zip(events, results, strict=True):
            if event.arms and r.status is EventStatus.ACCEPTED:
                kind = event.type.name.lower() if isinstance(event.type, EventType) else ""
                for pair in event.arms.split(","):
                    experiment, _, arm = pair.partition("=")
                    EXPERIMENT_EVENTS.labels(experiment, arm, kind).inc()
        response = storefront_pb2.TrackResponse(
            statuses=[storefront_pb2.EventStatus.Name(r.status) for r in results],
            errors=[r.error for r in results],
        )
        TRACK_ACK_SECONDS.observe(time.perf_counter() - received)
        return response


def catalog_writer(
    settings: GatewaySettings, live: LiveCatalog | None, encode: Callable[[list[str]], Any]
) -> CatalogWriter | None:
    """The build's UpdateItems writer; None when catalog updates are off."""
    feed = feed_for(settings)
    if live is None or feed is None:
        return None
    return CatalogWriter(live, feed, encode, settings.max_catalog_updates)


def make_store(settings: GatewaySettings, attributes: Attributes) -> OnlineStateStore:
    if settings.state == "redis":
        return RedisStateStore.from_url(settings.redis_url, attributes)
    return InMemoryStateStore(attributes)


def make_event_log(settings: GatewaySettings) -> DurableLog:
    """Track's durable log: this process's file log, or Redis Streams shared by every gateway
    (``event_log=redis``; the AOF settings of its masters are checked and any shortfall
    logged)."""
    if settings.event_log == "file":
        return EventLog(settings.event_log_dir)
    stream = RedisEventStream.from_url(
        settings.redis_url,
        StreamConfig(
            partitions=settings.stream_partitions,
            retention_s=settings.stream_retention_s,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        ),
    )
    for warning in durability_warnings(stream.client):
        log.warning("event stream durability falls short", extra={"detail": warning})
    return stream


def stage_clients(
    settings: GatewaySettings, closers: list[Callable[[], None]]
) -> dict[StageName, GrpcStage]:
    """The four stage services over gRPC (``stages=grpc``), shared by every build."""
    tls = (
        channel_credentials(
            settings.stage_tls_ca_file,
            settings.stage_tls_cert_file,
            settings.stage_tls_key_file,
        )
        if settings.stage_tls_ca_file
        else None
    )
    remote = [
        GrpcStage(
            e.binding(),
            getattr(settings, f"{e.name}_addr"),
            tls,
            settings.stage_attempts,
            packed=settings.packed_candidates,
        )
        for e in STAGES
    ]
    # connect now, so that the first requests after a (re)start do not pay for it; a stage
    # that is down is not waited for: its calls degrade until it is back (with several
    # replicas: until one is back; the channel is ready once any replica is)
    for client in remote:
        closers.append(client.close)
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(client.channel).result(timeout=1.0)
    return {client.stage: client for client in remote}


def local_stages(
    settings: GatewaySettings, build: Path, closers: list[Callable[[], None]]
) -> dict[StageName, StageClient]:
    """The four stages' engines of one build in this process (``stages=local``), loaded
    through the same wiring their services use."""
    shared_state = {"state": settings.state, "redis_url": settings.redis_url}
    engines = load_engines(build, closers, {"recall": shared_state})
    build_id = build_id_of(build)
    return {stage: LocalStage(stage, engine, build_id) for stage, engine in engines.items()}


def spec(settings: GatewaySettings) -> ServiceSpec:
    resources: list[Callable[[], None]] = []
    remote: dict[StageName, GrpcStage] = {}
    first = threading.Event()  # set once the first build is loaded: later ones wait for stages

    state: list[OnlineStateStore] = []  # made in warm-up: it may connect to Redis

    def current() -> Gateway:
        return builds.get()[1]

    def load_build(build: Path, closers: list[Callable[[], None]]) -> Gateway:
        """One build's gateway. A build published later becomes current only once every
        stage service has it loaded (so no request is pinned to a build a stage lacks)."""
        from sluice.embed.onnx import query_encoder

        artifacts = serving_artifacts(build, settings)
        speller = speller_for(artifacts.catalog, settings)
        learn = [lambda live, rows: speller.learn(live.catalog, rows)] if speller else []
        live = follow_updates(settings, artifacts, closers, *learn)
        build_id = build_id_of(build)
        encoder = query_encoder(build, threads=settings.torch_threads)
        # queries may use the quantized export; item texts (live updates) and blurbs stay fp32
        queries = (
            encoder
            if settings.query_encoder == "fp32"
            else query_encoder(build, settings.torch_threads, settings.query_encoder)
        )
        stages: Mapping[StageName, StageClient] = (
            remote if settings.stages == "grpc" else local_stages(settings, build, closers)
        )
        query = QueryEncoder(queries.encode)
        gateway = Gateway(
            stages,
            artifacts.catalog,
            UserHistory.from_artifacts(artifacts, state[0]),
            query,
            GatewayLimits.from_settings(settings),
            tokens,
            # with the stages in this process recall cannot be down on its own
            FallbackRecall.from_artifacts(artifacts) if settings.stages == "grpc" else None,
            build_id=build_id,
            rules=rules,
            explainer=Explainer.from_artifacts(
                artifacts, live_popularity=settings.state == "redis"
            ),
            blurbs=blurbs_for(settings, artifacts, encoder.encode),
            experiments=experiments,
            shadow=shadow[0] if shadow else None,
            sessions=Sessions(Refiner.from_artifacts(artifacts, query), state[0]),
            catalog_writer=catalog_writer(settings, live, encoder.encode),
            speller=speller,
        )
        gateway.encode_query("warm up")
        if first.is_set() and settings.stages == "grpc":
            wait_for_stages(build_id)
        return gateway

    def wait_for_stages(build_id: str) -> None:
        """Until every stage replica has ``build_id``; Unavailable (the build is tried again
        later) after ``build_switch_wait_s``, or at once when another build is published
        meanwhile, so that the watcher moves on to it."""
        deadline = time.monotonic() + settings.build_switch_wait_s
        for client in remote.values():
            while True:
                remaining = deadline - time.monotonic()
                try:
                    client.wait_for_build(build_id, max(0.1, min(remaining, 5.0)))
                    break
                except Unavailable:
                    if remaining <= 5.0 or published() != build_id:
                        raise

    def published() -> str:
        with contextlib.suppress(OSError, ValueError, SluiceError):
            return build_id_of(resolve(settings.artifacts))
        return ""

    # the merchant's rules: one file for every build, read now (a bad file stops the start)
    rules = (
        RulesWatcher(settings.rules_file, settings.rules_poll_s) if settings.rules_file else None
    )
    if rules is not None:
        resources.append(rules.start().close)
    experiments = (
        ExperimentsWatcher(settings.experiments_file, settings.rules_poll_s)
        if settings.experiments_file
        else None
    )
    if experiments is not None:
        resources.append(experiments.start().close)
    shadow: list[ShadowArms] = []  # made with the stage clients (warm-up)
    builds: LoadedBuilds[Gateway] = LoadedBuilds(load_build, retain_s=settings.build_retain_s)
    tokens = PageTokens.from_settings(
        [k.get_secret_value() for k in settings.page_token_keys], MAX_PAGE_OFFSET
    )
    servicer = StorefrontServicer(settings, builds)
    hooks = serve_builds(builds, settings)

    def register(server: grpc.Server) -> list[str]:
        storefront_pb2_grpc.add_StorefrontServiceServicer_to_server(servicer, server)
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(
            CatalogServicer(
                [k.get_secret_value() for k in settings.catalog_api_keys],
                lambda: current().catalog_writer,
            ),
            server,
        )
        return [
            storefront_pb2.DESCRIPTOR.services_by_name["StorefrontService"].full_name,
            catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
        ]

    def warmup() -> None:
        # the current build's catalog (live updates included), one lookup per applied batch
        store = make_store(settings, CatalogAttributes(lambda: current().catalog))
        state.append(store)
        resources.append(store.close)
        if settings.stages == "grpc":
            remote.update(stage_clients(settings, resources))
        if experiments is not None and settings.shadow_log_dir is not None:
            shadow.append(ShadowArms(settings.shadow_log_dir))
            resources.append(shadow[0].close)
        hooks["warmup"]()  # the first build, and the watcher of later ones
        first.set()
        event_log = make_event_log(settings)
        ingestor = Ingestor(
            event_log,
            store,
            known_item=lambda item: current().catalog.contains(item),
            known_items=lambda items: (current().catalog.rows(items) >= 0).tolist(),
            max_in_flight=settings.track_max_in_flight,
        )
        recovered = ingestor.recover()
        log.info("event log replayed", extra={"events": recovered})
        resources.append(event_log.close)
        collector = EventMetrics(event_log, ingestor)
        REGISTRY.register(collector)
        resources.append(lambda: REGISTRY.unregister(collector))
        servicer.ingestor = ingestor

    def shutdown() -> None:
        hooks["shutdown"]()
        for close in reversed(resources):
            close()

    # Track has its own back-pressure (events in flight); DeleteUser is rare
    return ServiceSpec(
        "gateway",
        register,
        warmup,
        shutdown,
        admitted_methods=frozenset({"Search", "Recommend"}),
        attach_health=hooks["attach_health"],
    )
