"""OpenTelemetry tracing across the gateway, the stages and the fine stage's call to Triton.

Off unless a service is given an OTLP endpoint (``SLUICE_<SERVICE>_OTLP_ENDPOINT``). Then the
bootstrap (:func:`sluice.core.server.bind`) calls :func:`install`, which sets up an SDK tracer
provider that samples by ``trace_sample_ratio`` (following a caller's sampling decision) and
exports spans in batches over OTLP/gRPC, and:

* every RPC the service serves gets a SERVER span (opentelemetry-instrumentation-grpc's server
  interceptor) that continues the caller's W3C trace context (``traceparent`` and
  ``tracestate`` in the gRPC metadata); the request id of a call that brings no
  ``x-request-id`` is its trace id, so the two name the same request;
* the gateway's calls to the stage services get CLIENT spans and carry the trace context
  (the same library's client interceptor, on the channels :func:`traced_channel` wraps);
* the fine stage's Triton call gets a CLIENT span (:func:`client_span`), and its context
  travels to Triton in the request's headers;
* with ``stages=local`` each stage the gateway runs in its own process gets an INTERNAL span
  (:func:`internal_span`).

The provider lives here, not in OpenTelemetry's global slot: a process (or a test) can install
and shut down tracing more than once, and nothing traces that was not asked to.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

import sluice

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# The span attribute that holds a caller's own ``x-request-id`` (the alias of the trace).
REQUEST_ID_ATTRIBUTE = "sluice.request_id"
STAGE_ATTRIBUTE = "sluice.stage"

# Per the OpenTelemetry RPC conventions a server span is an error only for these codes; the
# rest (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...) are the caller's to handle.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


@dataclass(frozen=True)
class TracingConfig:
    """Where and how a service exports its spans (``ServiceSettings.tracing_config()``)."""

    endpoint: str
    """OTLP/gRPC collector: ``http://host:4317`` (plaintext) or ``https://host:4317`` (TLS)."""
    service_name: str = ""
    """``service.name`` of the spans; empty: ``sluice-<service>``."""
    sample_ratio: float = 1.0
    """Share of new traces recorded; a caller's sampling decision is followed."""
    export_delay_ms: int = 5000
    """The longest a finished span waits in the batch before it is exported."""
    export_timeout_s: float = 10.0
    max_queue_size: int = 2048
    """Finished spans held for export; beyond it new ones are dropped (requests never wait)."""
    ca_file: Path | None = None
    """Verify an ``https://`` collector with this CA; None: the system's roots."""


class Tracing:
    """One service's tracer provider, its exporter and its gRPC interceptors."""

    def __init__(self, config: TracingConfig, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.config = config
        self.service = service
        # OTEL_RESOURCE_ATTRIBUTES (for example a pod's name) is merged in by Resource.create
        resource = Resource.create(
            {
                SERVICE_NAME: config.service_name or f"sluice-{service}",
                SERVICE_VERSION: sluice.__version__,
                "service.namespace": "sluice",
            }
        )
        credentials = (
            grpc.ssl_channel_credentials(config.ca_file.read_bytes()) if config.ca_file else None
        )
        exporter = OTLPSpanExporter(
            endpoint=config.endpoint, credentials=credentials, timeout=config.export_timeout_s
        )
        self.provider: TracerProvider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio))
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                schedule_delay_millis=config.export_delay_ms,
                max_queue_size=config.max_queue_size,
                export_timeout_millis=int(config.export_timeout_s * 1000),
            )
        )
        self.tracer = self.provider.get_tracer("sluice", sluice.__version__)

    def server_interceptor(self) -> grpc.ServerInterceptor:
        """SERVER spans for every RPC but health checks and reflection."""
        from opentelemetry.instrumentation.grpc import filters, server_interceptor

        probes = filters.any_of(
            filters.service_prefix("grpc.health"), filters.service_prefix("grpc.reflection")
        )
        interceptor: grpc.ServerInterceptor = server_interceptor(
            tracer_provider=self.provider, filter_=filters.negate(probes)
        )
        return interceptor

    def intercept_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """``channel`` with CLIENT spans and the trace context on every call."""
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        traced: grpc.Channel = intercept_channel(
            channel, client_interceptor(tracer_provider=self.provider)
        )
        return traced

    def shutdown(self) -> None:
        """Export what is buffered, then stop; the process traces nothing more."""
        global _active
        with _lock:
            if _active is self:
                _active = None
        self.provider.shutdown()


_lock = threading.Lock()
_active: Tracing | None = None


def install(config: TracingConfig, service: str) -> Tracing:
    """Trace this process as ``service`` (``gateway``, ``recall``, ...) from now on."""
    global _active
    tracing = Tracing(config, service)
    with _lock:
        _active = tracing
    return tracing


def active() -> Tracing | None:
    """The installed tracing; None when this process does not trace."""
    return _active


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with client spans and trace propagation when tracing is on, else itself."""
    tracing = _active
    return tracing.intercept_channel(channel) if tracing is not None else channel


@contextlib.contextmanager
def client_span(name: str, attributes: Mapping[str, AttributeValue]) -> Iterator[dict[str, str]]:
    """A CLIENT span around a call this process makes by other means than a traced channel.

    Yields the headers (``traceparent``, ``tracestate``) that carry the span's context to the
    server: empty when tracing is off. An exception leaving the block marks the span an error.
    """
    tracing = _active
    if tracing is None:
        yield {}
        return
    with tracing.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers


@contextlib.contextmanager
def internal_span(name: str, attributes: Mapping[str, AttributeValue]) -> Iterator[None]:
    """An INTERNAL span (a stage run in this process); nothing when tracing is off."""
    tracing = _active
    if tracing is None:
        yield
        return
    with tracing.tracer.start_as_current_span(name, kind=SpanKind.INTERNAL, attributes=attributes):
        yield


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits); empty when there is none."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def annotate_request(request_id: str) -> None:
    """Record a caller's own ``x-request-id`` on the current (server) span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


def record_outcome(code: grpc.StatusCode, message: str = "") -> None:
    """The RPC's status on the current (server) span.

    The instrumentation's interceptor sees ``context.abort`` but not ``abort_with_status``,
    which is how domain errors leave a Sluice service; so the bootstrap records every outcome
    here."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERROR_CODES:
        span.set_status(
            Status(StatusCode.ERROR, f"{code.name}: {message}" if message else code.name)
        )
