"""OpenTelemetry tracing: one Search is one trace, with a span per stage and the Triton call.

A real OTLP/gRPC collector (the ``opentelemetry-proto`` TraceService) runs in the test; the
services export to it through their settings (``SLUICE_<SERVICE>_OTLP_ENDPOINT``), as they
would to an OpenTelemetry Collector, Jaeger or Tempo. The split layout runs on TLS everywhere
(mTLS between the services, an API key at the gateway), the one-machine layout in plaintext.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2 as otel_common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from pydantic import ValidationError

from sluice.artifacts import Artifacts
from sluice.config import GatewaySettings, RerankSettings
from sluice.core.server import bind
from sluice.launch import Cluster, ClusterTls
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.integration

SERVICES = ("gateway", "recall", "coarse", "fine", "rerank")
STAGES = ("recall", "coarse", "fine", "rerank")
SEARCH = "/sluice.v1.StorefrontService/Search"
TRITON = "/inference.GRPCInferenceService/ModelInfer"
KEY = "tracing-storefront-key"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
WAIT_S = 60.0


# -- an OTLP/gRPC collector ---------------------------------------------------------------
def _value(v: otel_common_pb2.AnyValue) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class Received:
    """One exported span, as the collector got it."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    status: int


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it; tests wait on a condition over them."""

    def __init__(self) -> None:
        self._spans: list[Received] = []
        self._changed = threading.Condition()

    def Export(  # noqa: N802
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Received(
                            service=str(resource.get("service.name")),
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status=s.status.code,
                        )
                    )
        with self._changed:
            self._spans.extend(got)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Received]:
        with self._changed:
            return list(self._spans)

    def wait_for(
        self, found: Callable[[list[Received]], object], what: str, timeout_s: float = WAIT_S
    ) -> list[Received]:
        """The spans so far, once ``found(spans)`` is true; fails after ``timeout_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: found(self._spans), timeout_s):
                seen = "\n".join(
                    f"  {s.service} {s.name} kind={s.kind} trace={s.trace_id}" for s in self._spans
                )
                pytest.fail(f"no {what} within {timeout_s:.0f} s; spans received:\n{seen}")
            return list(self._spans)


def serve_collector(
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[Collector, grpc.Server, int]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return collector, server, port


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, str]]:
    """A plaintext OTLP/gRPC collector and its endpoint."""
    found, server, port = serve_collector()
    yield found, f"http://127.0.0.1:{port}"
    server.stop(0)


def tracing_env(endpoint: str) -> dict[str, str]:
    """Every service exports to ``endpoint``, in batches sent 50 ms after their first span.

    A call without a deadline gets the gateway's default budget (250 ms), which a stage can
    overrun on a busy test machine and be skipped (degraded); these tests need every stage to
    run, so the budget is generous."""
    env = {"SLUICE_GATEWAY_DEADLINE_MS": "30000"}
    for name in SERVICES:
        env[f"SLUICE_{name.upper()}_OTLP_ENDPOINT"] = endpoint
        env[f"SLUICE_{name.upper()}_TRACE_EXPORT_DELAY_MS"] = "50"
    return env


# -- the two layouts ----------------------------------------------------------------------
@dataclass
class Traced:
    """A running cluster that exports to the collector, and how to call its gateway."""

    cluster: Cluster
    collector: Collector
    layout: str
    stub: storefront_pb2_grpc.StorefrontServiceStub
    metadata: tuple[tuple[str, str], ...] = ()

    def search(
        self, metadata: tuple[tuple[str, str], ...] = (), query: str = "running shoes"
    ) -> tuple[storefront_pb2.SearchResponse, dict[str, str]]:
        """One Search with no deadline; the response and its trailing metadata."""
        request = storefront_pb2.SearchRequest(query=query, page_size=5)
        response, call = self.stub.Search.with_call(request, metadata=(*self.metadata, *metadata))
        return response, dict(call.trailing_metadata())


@pytest.fixture(scope="module", params=["grpc", "local"])
def traced(
    request: pytest.FixtureRequest,
    tiny_artifacts: Artifacts,
    certs: ClusterTls,
    collector: tuple[Collector, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Traced]:
    """The split layout on TLS with an API key; the one-machine layout in plaintext."""
    found, endpoint = collector
    layout = str(request.param)
    base = tmp_path_factory.mktemp(f"traced-{layout}")
    env = tracing_env(endpoint)
    if layout == "grpc":
        clusters = running_cluster(tiny_artifacts, base, extra_env=env, tls=certs, api_keys=(KEY,))
    else:
        clusters = running_cluster(tiny_artifacts, base, stages="local", extra_env=env)
    for cluster in clusters:
        if layout == "grpc":
            creds = grpc.ssl_channel_credentials(certs.ca.read_bytes())
            channel = grpc.secure_channel(cluster.gateway_address, creds)
            metadata: tuple[tuple[str, str], ...] = (("x-api-key", KEY),)
        else:
            channel = grpc.insecure_channel(cluster.gateway_address)
            metadata = ()
        with channel:
            stub = storefront_pb2_grpc.StorefrontServiceStub(channel)
            yield Traced(cluster, found, layout, stub, metadata)


# -- what one Search's trace holds ----------------------------------------------------------
@dataclass
class SearchTrace:
    """The spans of one Search: the gateway's server span, one span per stage (a server span
    in the stage's service behind the gateway's client span, or the gateway's internal span
    in the one-machine layout) and the fine stage's Triton call."""

    root: Received
    stage: dict[str, Received]
    stage_client: dict[str, Received]
    triton: Received
    spans: list[Received]


def search_trace(spans: list[Received], trace_id: str, layout: str) -> SearchTrace | None:
    """The Search trace ``trace_id`` once all its spans have arrived, else None."""
    mine = [s for s in spans if s.trace_id == trace_id]
    roots = [s for s in mine if s.service == "sluice-gateway" and s.kind == SERVER]
    if len(roots) != 1 or roots[0].name != SEARCH:
        return None
    root = roots[0]
    stage: dict[str, Received] = {}
    stage_client: dict[str, Received] = {}
    if layout == "grpc":
        clients = {
            s.span_id: s
            for s in mine
            if s.service == "sluice-gateway" and s.kind == CLIENT and s.parent_id == root.span_id
        }
        for name in STAGES:
            served = [s for s in mine if s.service == f"sluice-{name}" and s.kind == SERVER]
            if len(served) != 1 or served[0].parent_id not in clients:
                return None
            stage[name] = served[0]
            stage_client[name] = clients[served[0].parent_id]
    else:
        for name in STAGES:
            ran = [
                s for s in mine if s.kind == INTERNAL and s.attributes.get("sluice.stage") == name
            ]
            if len(ran) != 1 or ran[0].parent_id != root.span_id:
                return None
            stage[name] = ran[0]
    tritons = [s for s in mine if s.kind == CLIENT and s.name == TRITON]
    if len(tritons) != 1 or tritons[0].parent_id != stage["fine"].span_id:
        return None
    return SearchTrace(root, stage, stage_client, tritons[0], mine)


def wait_for_search(traced: Traced, trace_id: str) -> SearchTrace:
    found: list[SearchTrace] = []

    def arrived(spans: list[Received]) -> bool:
        t = search_trace(spans, trace_id, traced.layout)
        if t is not None:
            found.append(t)
        return t is not None

    traced.collector.wait_for(arrived, f"complete Search trace {trace_id} ({traced.layout})")
    return found[0]


def request_spans(spans: list[Received]) -> list[Received]:
    """The spans that belong to some request. The fine engine's warm-up calls Triton before
    any request (root CLIENT spans, one trace each); health checks are not traced."""
    return [s for s in spans if s.kind == SERVER or s.parent_id]


# -- the tests ------------------------------------------------------------------------------
def test_one_search_is_one_trace_with_a_span_per_stage(traced: Traced) -> None:
    before = len(traced.collector.spans())
    response, trailing = traced.search()
    assert [s.degraded for s in response.stages] == [False] * 4  # every stage ran
    # no x-request-id from the caller: the request id is the trace id
    trace_id = trailing["x-request-id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    t = wait_for_search(traced, trace_id)
    assert t.root.parent_id == ""  # the caller sent no trace context: the gateway starts it
    assert t.root.attributes["rpc.service"] == "sluice.v1.StorefrontService"
    assert t.root.attributes["rpc.grpc.status_code"] == 0
    if traced.layout == "grpc":
        for name, span in t.stage.items():
            client = t.stage_client[name]
            assert client.name == span.name  # /sluice.<stage>.v2.<Stage>Service/<Method>
            assert span.name.startswith(f"/sluice.{name}.v2.")
            assert span.attributes["rpc.grpc.status_code"] == 0
        expected = 1 + 2 * len(STAGES) + 1
    else:
        assert {s.service for s in t.spans} == {"sluice-gateway"}
        expected = 1 + len(STAGES) + 1
    # the Triton call: a CLIENT span of the fine stage (the fine service, or the gateway
    # that runs it), inside the stage's span
    fine_service = "sluice-fine" if traced.layout == "grpc" else "sluice-gateway"
    assert t.triton.service == fine_service
    assert t.triton.attributes["rpc.method"] == "ModelInfer"
    assert t.triton.attributes["sluice.triton.model"] == "fine_ranker"
    assert t.triton.status != trace_pb2.Status.STATUS_CODE_ERROR
    assert len(t.spans) == expected, [s.name for s in t.spans]
    # exactly one trace: every span of a request since the Search was sent is in it
    new = request_spans(traced.collector.spans()[before:])
    assert {s.trace_id for s in new} == {trace_id}, [(s.service, s.name) for s in new]


def test_a_callers_trace_context_is_continued(traced: Traced) -> None:
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{caller_trace}-{caller_span}-01"
    _, trailing = traced.search((("traceparent", traceparent),))
    assert trailing["x-request-id"] == caller_trace  # the alias follows the caller's trace
    t = wait_for_search(traced, caller_trace)
    assert t.root.parent_id == caller_span
    assert {s.trace_id for s in t.spans} == {caller_trace}


def test_x_request_id_stays_an_alias_echoed_recorded_and_logged(traced: Traced) -> None:
    rid = f"storefront-{uuid.uuid4().hex[:12]}"
    _, trailing = traced.search((("x-request-id", rid),))
    assert trailing["x-request-id"] == rid

    def gateway_span(spans: list[Received], rid: str) -> Received | None:
        return next(
            (
                s
                for s in spans
                if s.service == "sluice-gateway"
                and s.kind == SERVER
                and s.attributes.get("sluice.request_id") == rid
            ),
            None,
        )

    tagged = traced.collector.wait_for(
        lambda spans: gateway_span(spans, rid), f"gateway span tagged {rid}"
    )
    root = gateway_span(tagged, rid)
    assert root is not None and root.name == SEARCH
    t = wait_for_search(traced, root.trace_id)
    # the gateway passes the caller's id on: every service's server span carries it
    for span in t.spans:
        if span.kind == SERVER:
            assert span.attributes["sluice.request_id"] == rid, span.service

    # a failing request's log line carries both, and its span records the status
    bad = f"storefront-bad-{uuid.uuid4().hex[:12]}"
    with pytest.raises(grpc.RpcError) as err:
        traced.search((("x-request-id", bad),), query=" ")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["x-request-id"] == bad
    traced.cluster.wait_for_log("gateway", bad)
    lines = (traced.cluster.log_dir / "gateway.log").read_text(errors="replace").splitlines()
    logged = [json.loads(line) for line in lines if bad in line and line.startswith("{")]
    assert logged and logged[0]["request_id"] == bad
    failed = traced.collector.wait_for(
        lambda spans: gateway_span(spans, bad), f"gateway span tagged {bad}"
    )
    refused = gateway_span(failed, bad)
    assert refused is not None
    assert logged[0]["trace_id"] == refused.trace_id
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # the caller's mistake, not the server's: the span is not an error
    assert refused.status == trace_pb2.Status.STATUS_CODE_UNSET


# -- in process: the bootstrap, a TLS collector, and the settings ----------------------------
def test_a_server_error_is_an_error_span_sent_to_a_tls_collector(
    certs: ClusterTls, tmp_path: Path
) -> None:
    """A gateway that is not warm answers UNAVAILABLE (through ``abort_with_status``, which the
    instrumentation alone does not see); its span says so, and reaches a collector that the
    service verifies with ``otlp_ca_file``. Health checks make no spans."""
    from sluice.gateway.service import spec

    creds = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())]
    )
    found, server, port = serve_collector(creds)
    settings = GatewaySettings(
        port=0,
        event_log_dir=tmp_path / "events",
        otlp_endpoint=f"https://127.0.0.1:{port}",
        otlp_ca_file=certs.ca,
        trace_export_delay_ms=50,
    )
    svc = bind(spec(settings), settings.server_options())  # never warmed up
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                storefront_pb2_grpc.StorefrontServiceStub(ch).Search(
                    storefront_pb2.SearchRequest(query="shoes", page_size=1), timeout=10
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rid = dict(err.value.trailing_metadata())["x-request-id"]
        spans = found.wait_for(lambda spans: any(s.trace_id == rid for s in spans), "span")
    finally:
        svc.stop(0.5)  # exports what is left
        server.stop(0)
    span = next(s for s in spans if s.trace_id == rid)
    assert span.service == "sluice-gateway" and span.kind == SERVER and span.name == SEARCH
    assert span.status == trace_pb2.Status.STATUS_CODE_ERROR
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert [s.name for s in found.spans()] == [SEARCH]  # the health check made none


def test_tracing_is_off_unless_an_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in SERVICES:
        monkeypatch.delenv(f"SLUICE_{name.upper()}_OTLP_ENDPOINT", raising=False)
    assert RerankSettings().server_options().tracing is None
    assert GatewaySettings(event_log_dir=tmp_path).server_options().tracing is None
    options = RerankSettings(otlp_endpoint="http://collector:4317", trace_sample_ratio=0.25)
    config = options.server_options().tracing
    assert config is not None and config.sample_ratio == 0.25
    assert config.endpoint == "http://collector:4317"
    with pytest.raises(ValidationError, match="otlp_endpoint"):
        RerankSettings(otlp_endpoint="collector:4317")
    with pytest.raises(ValidationError, match="otlp_ca_file"):
        RerankSettings(otlp_endpoint="http://collector:4317", otlp_ca_file=tmp_path / "ca.pem")
