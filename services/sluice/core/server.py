"""The one bootstrap every Sluice gRPC service runs on.

It owns the server, standard health checking (NOT_SERVING until the service
is warm), reflection, the request-id / error-mapping / metrics interceptor,
OpenTelemetry tracing (``core.tracing``, when configured), the Prometheus
endpoint and graceful shutdown on SIGTERM. A service supplies only its
servicers and a warm-up function.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_status import rpc_status
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from sluice.core import heap, tracing
from sluice.core import logging as slog
from sluice.core.admission import AdaptiveLimit, Admission, AdmissionConfig
from sluice.core.auth import Guard, RateLimits
from sluice.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DeadlineTooShort,
    ResourceExhausted,
    SluiceError,
    decode_or_abort,
    decode_request,
)
from sluice.core.health import SERVICE_NAME as HEALTH_SERVICE
from sluice.core.health import HealthServicer
from sluice.core.tracing import TracingConfig

log = logging.getLogger(__name__)

RPC_TOTAL = Counter("sluice_rpc_requests_total", "RPCs handled", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "sluice_rpc_duration_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0),
)
QUEUE_WAIT = Histogram(
    "sluice_queue_wait_seconds",
    "Time an admitted request waited for a handler's turn before its work started",
    ["service"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 1.0),
)
QUEUE_WAITING = Gauge(
    "sluice_queue_waiting_requests",
    "Admitted requests waiting for a handler's turn now",
    ["service"],
)


class _LogBudget:
    """At most ``per_s`` lines a second per key; the rest are counted and reported with the
    next line that gets through, so a flood of bad requests cannot flood the logs."""

    def __init__(self, per_s: float = 5.0) -> None:
        self._bucket = RateLimits(per_s, per_s)
        self._lock = threading.Lock()
        self._dropped: dict[tuple[str, str], int] = {}

    def admit(self, key: tuple[str, str]) -> int | None:
        """None: stay quiet; else log now, mentioning this many suppressed lines."""
        try:
            self._bucket.charge("/".join(key))
        except ResourceExhausted:
            with self._lock:
                self._dropped[key] = self._dropped.get(key, 0) + 1
            return None
        with self._lock:
            return self._dropped.pop(key, 0)


class _Interceptor(grpc.ServerInterceptor):
    """Request id in, requests decoded, domain errors mapped to statuses, metrics out.

    The interceptor decodes each request itself (grpcio would answer an undecodable one
    with INTERNAL and a traceback): bytes that are not the method's message, or that hold
    invalid UTF-8 in a string field, are the caller's fault and get INVALID_ARGUMENT.
    """

    def __init__(
        self, gate: _Gate | None = None, guard: Guard | None = None, traced: bool = False
    ) -> None:
        self._log_budget = _LogBudget()
        self._gate = gate
        self._guard = guard
        self._traced = traced

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method_path: str = handler_call_details.method
        deserialize = handler.request_deserializer
        inner = handler.unary_unary
        if method_path.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        service, _, method = method_path.rpartition("/")
        service = service.lstrip("/")
        metadata = dict(handler_call_details.invocation_metadata or ())
        budget = self._log_budget
        gate = self._gate
        guard = self._guard
        limit = gate.limit_for(method) if gate is not None else None
        traced = self._traced

        def wrapped(raw: Any, context: grpc.ServicerContext) -> Any:
            # the caller's x-request-id; else, when traced, the trace id (the tracing
            # interceptor runs first and has opened the server span)
            rid = metadata.get(slog.REQUEST_ID_HEADER)
            if rid and traced:
                tracing.annotate_request(str(rid)[:64])
            rid = rid or (tracing.current_trace_id() if traced else "") or slog.new_request_id()
            token = slog.request_id_var.set(str(rid)[:64])
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            # the request id goes back in trailing metadata: it rides with the status, where
            # initial metadata would cost an extra send (~0.2 ms CPU per hop measured)
            echo = ((slog.REQUEST_ID_HEADER, slog.request_id_var.get()),)
            admitted = False
            failure: SluiceError | None = None
            try:
                context.set_trailing_metadata(echo)
                if guard is not None:
                    guard.check(metadata, context, service)
                if limit is not None and gate is not None:
                    if not limit.try_acquire():
                        raise gate.admission.refuse(start)
                    admitted = True
                    request = _decode(deserialize, raw)
                    with gate.run(context):
                        return inner(request, context)
                return inner(_decode(deserialize, raw), context)
            except SluiceError as err:
                code, failure = err.code, err
                dropped = budget.admit((method, code.name))
                if dropped is not None:
                    log.info(
                        "request failed",
                        extra={
                            "method": method,
                            "code": code.name,
                            "error": err.message[:500],
                            "suppressed": dropped,
                        },
                    )
                status = rpc_status.to_status(err.to_status())
                context.abort_with_status(
                    status._replace(trailing_metadata=(*status.trailing_metadata, *echo))
                )
            except Exception:
                code = context.code() if _aborted(context) else grpc.StatusCode.INTERNAL
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("unhandled error", extra={"method": method})
                    context.abort(grpc.StatusCode.INTERNAL, "internal error; see server logs")
                raise
            finally:
                elapsed = time.perf_counter() - start
                if admitted and limit is not None:
                    # what steers the limit: served requests' latency, and running out of time
                    ran_out = code is grpc.StatusCode.DEADLINE_EXCEEDED and not isinstance(
                        failure, DeadlineTooShort
                    )
                    limit.release(
                        elapsed, sample=code is grpc.StatusCode.OK or ran_out, ok=not ran_out
                    )
                RPC_TOTAL.labels(service, method, code.name).inc()
                RPC_LATENCY.labels(service, method).observe(elapsed)
                if traced:
                    tracing.record_outcome(code, failure.message if failure else "")
                slog.request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=None,  # raw bytes: decoded in ``wrapped``
            response_serializer=handler.response_serializer,
        )


def _decode(deserialize: Callable[[bytes], Any] | None, raw: Any) -> Any:
    return raw if deserialize is None else decode_request(deserialize, raw)


# grpcio reports a huge time_remaining() when the caller set no deadline; past this many
# seconds a "deadline" is taken as none, and the service's default budget applies.
NO_DEADLINE_S = 24 * 3600.0


def caller_timeout_s(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline; None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_S:
        return None
    return float(remaining)


class _Gate:
    """Admission control (refuse beyond the adaptive limit) in front of an execution gate
    (at most ``workers`` requests run at once; the admitted rest wait their turn).

    A request that waits leaves its place as soon as its caller goes away (cancelled, or its
    deadline passed): it does not hold a thread and an admission slot until a turn frees.
    """

    def __init__(
        self, service: str, admission: Admission, workers: int, methods: frozenset[str] | None
    ) -> None:
        self.admission = admission
        self.methods = methods
        self._turns = threading.Condition(threading.Lock())
        self._free = workers
        self._waited = QUEUE_WAIT.labels(service)
        self._waiting = QUEUE_WAITING.labels(service)

    def limit_for(self, method: str) -> AdaptiveLimit | None:
        """The service's one limit, for the methods it governs (all when None)."""
        if self.methods is not None and method not in self.methods:
            return None
        return self.admission.limit

    @contextlib.contextmanager
    def run(self, context: grpc.ServicerContext) -> Iterator[None]:
        queued = time.perf_counter()
        try:
            self._take_turn(context)
        finally:
            self._waited.observe(time.perf_counter() - queued)  # those that left too
        try:
            left = caller_timeout_s(context)
            if left is not None and left <= 0:
                raise DeadlineExceeded("the deadline passed while the request waited its turn")
            if not context.is_active():  # cancelled while it waited: do not start the work
                raise Cancelled("the caller went away while the request waited its turn")
            yield
        finally:
            with self._turns:
                self._free += 1
                self._turns.notify()

    def _take_turn(self, context: grpc.ServicerContext) -> None:
        """A turn, waited for while the caller is there. A waiter that a freed turn wakes
        takes it even if its caller has gone (``run`` then gives it back), so a turn is
        never left free while others sleep."""
        with self._turns:
            if self._free > 0:  # no wait: nothing to watch
                self._free -= 1
                return
        waiting = True

        def ended() -> None:  # the call ended (cancelled, deadline passed): wake its waiter
            if waiting:
                with self._turns:
                    self._turns.notify_all()

        wait_s = caller_timeout_s(context)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        context.add_callback(ended)
        self._waiting.inc()
        try:
            with self._turns:
                while self._free == 0:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise DeadlineExceeded("the deadline passed while the request waited")
                    if not context.is_active():
                        raise Cancelled("the caller went away while the request waited")
                    self._turns.wait(left)
                self._free -= 1
        finally:
            waiting = False
            self._waiting.dec()


def _aborted(context: grpc.ServicerContext) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code is not grpc.StatusCode.OK


@dataclass
class ServiceSpec:
    """What a service hands to :func:`serve`."""

    name: str
    """Stage name used in logs and metrics ("recall", "gateway", ...)."""
    register: Callable[[grpc.Server], Iterable[str]]
    """Adds the servicers to the server; returns their full service names."""
    warmup: Callable[[], None] = lambda: None
    """Loads models and runs a first request; health turns SERVING after it."""
    shutdown: Callable[[], None] = lambda: None
    """Releases resources after the server has drained."""
    admitted_methods: frozenset[str] | None = None
    """The methods admission control governs (None: all); they share one limit."""
    attach_health: Callable[[Callable[[str, bool], None]], None] | None = None
    """Given ``set_health(name, serving)`` before warm-up: reports named parts (a loaded
    build, ``sluice.builds.health_name``) in the health service beside the service."""


class RunningService:
    """A started service; :meth:`stop` drains and shuts it down."""

    def __init__(
        self,
        spec: ServiceSpec,
        server: grpc.Server,
        health_servicer: HealthServicer,
        names: list[str],
        port: int,
        probe_server: grpc.Server | None = None,
        telemetry: tracing.Tracing | None = None,
    ) -> None:
        self.spec = spec
        self.server = server
        self.health = health_servicer
        self.names = names
        self.port = port
        self.probe_server = probe_server
        self.telemetry = telemetry
        self._stopped = threading.Event()
        self._parts: set[str] = set()

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.names]:
            self.health.set(name, status)
        if not serving:
            for name in list(self._parts):
                self.set_health(name, False)

    def set_health(self, name: str, serving: bool) -> None:
        """Report a named part of the service (see :attr:`ServiceSpec.attach_health`)."""
        self._parts.add(name)
        self.health.set(
            name,
            health_pb2.HealthCheckResponse.SERVING
            if serving and not self._stopped.is_set()
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def stop(self, grace_s: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        if self.probe_server is not None:
            self.probe_server.stop(0)
        self.server.stop(grace_s).wait()
        self.spec.shutdown()
        if self.telemetry is not None:  # exports the spans still buffered
            self.telemetry.shutdown()
        log.info("stopped")

    def warm(self) -> None:
        """Run the service's warm-up; health turns SERVING when it returns."""
        self.spec.warmup()
        self.set_serving(True)
        log.info("serving")

    def wait(self) -> None:
        self.server.wait_for_termination()


DEFAULT_MAX_REQUEST_BYTES = 4 << 20
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _serve_reflection(server: grpc.Server, names: list[str]) -> None:
    """Server reflection under both names clients use: ``grpc.reflection.v1`` (grpcurl,
    grpc-js, Postman) and ``v1alpha`` (older tools). grpcio-reflection implements only
    v1alpha; the two protocols are the same messages on the wire, so one servicer serves
    both. The error detail types (``google.rpc.Status``, ``BadRequest``, ``RetryInfo``)
    are in this process's descriptor pool, so a client can fetch them by symbol too.

    The requests are decoded here, as the interceptor does for the API (reflection bypasses
    it): a frame that is not a ``ServerReflectionRequest`` ends the stream with
    INVALID_ARGUMENT, where grpcio's own decoding would answer INTERNAL."""
    listed = [*names, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.ReflectionServicer(listed)
    parse = reflection_pb2.ServerReflectionRequest.FromString

    def info(raw_requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        requests = (decode_or_abort(parse, raw, context) for raw in raw_requests)
        return servicer.ServerReflectionInfo(requests, context)

    handler = grpc.stream_stream_rpc_method_handler(
        info, response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (reflection.SERVICE_NAME, REFLECTION_V1)
        )
    )


@dataclass(frozen=True)
class ServerOptions:
    """Where and how a service listens (``ServiceSettings.server_options()``)."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    """Prometheus /metrics; 0: none."""
    workers: int = 16
    """Requests that run at once."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """gRPC refuses a bigger request (RESOURCE_EXHAUSTED) before any of it is parsed."""
    reflection: bool = True
    admission: AdmissionConfig | None = None
    """With it, more handler threads take requests off the wire, so that one beyond the
    adaptive limit is refused at once (RESOURCE_EXHAUSTED with a RetryInfo) instead of
    queueing."""
    credentials: grpc.ServerCredentials | None = None
    """TLS (``core.auth.server_credentials``); None: plaintext."""
    guard: Guard | None = None
    """Caller checks (client certificate identity, storefront credentials, rate limits)."""
    health_port: int = 0
    """A second, plaintext port that serves only the health service (0: none): probes that
    cannot speak TLS, such as Kubernetes' gRPC probes, check a TLS service there."""
    tracing: TracingConfig | None = None
    """OpenTelemetry spans exported over OTLP (``core.tracing``); None: no tracing."""


def bind(spec: ServiceSpec, options: ServerOptions) -> RunningService:
    """Start listening with health NOT_SERVING; :meth:`RunningService.warm` makes it SERVING."""
    o = options
    gate = (
        _Gate(spec.name, Admission(spec.name, o.admission), o.workers, spec.admitted_methods)
        if o.admission
        else None
    )
    threads = o.workers + (o.admission.max_limit + 4 if o.admission else 0)
    telemetry = tracing.install(o.tracing, spec.name) if o.tracing is not None else None
    interceptors: list[grpc.ServerInterceptor] = [
        _Interceptor(gate, o.guard, telemetry is not None)
    ]
    if telemetry is not None:  # first: its server span encloses everything the others do
        interceptors.insert(0, telemetry.server_interceptor())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=spec.name),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", o.max_request_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = list(spec.register(server))
    health_servicer = HealthServicer()
    health_servicer.add_to(server)
    if o.reflection:
        _serve_reflection(server, [*names, HEALTH_SERVICE])
    address = f"{o.host}:{o.port}"
    if o.credentials is not None:
        bound = server.add_secure_port(address, o.credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"{spec.name}: cannot bind {o.host}:{o.port}")
    probe_server = None
    if o.health_port:
        probe_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_servicer.add_to(probe_server)
        if probe_server.add_insecure_port(f"{o.host}:{o.health_port}") == 0:
            raise OSError(f"{spec.name}: cannot bind the health port {o.health_port}")
    running = RunningService(spec, server, health_servicer, names, bound, probe_server, telemetry)
    running.set_serving(False)
    if spec.attach_health is not None:
        spec.attach_health(running.set_health)
    server.start()
    if probe_server is not None:
        probe_server.start()
    if o.metrics_port:
        start_http_server(o.metrics_port, addr=o.host)
    log.info("listening", extra={"port": bound, "metrics_port": o.metrics_port})
    return running


def start(spec: ServiceSpec, options: ServerOptions) -> RunningService:
    """Bind, warm up, then report SERVING."""
    running = bind(spec, options)
    running.warm()
    return running


def serve_forever(spec: ServiceSpec, options: ServerOptions) -> None:
    """Run a service until SIGTERM or SIGINT, then drain gracefully. This is a service
    process's entry point: once warm, its heap is frozen (:mod:`sluice.core.heap`)."""
    running = start(spec, options)
    heap.freeze()
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received, draining", extra={"signal": signum})
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    running.stop()
