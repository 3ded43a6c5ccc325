"""The cascade's stages as the gateway calls them: over gRPC, or in this process.

Both kinds answer :meth:`StageClient.call` with a :class:`~sluice.core.stage.StageResult`;
the gateway cannot tell them apart, which is what makes the two layouts answer alike.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.balancer import channel_options, parse_target, replica_addresses
from sluice.builds import health_name
from sluice.common.v1 import common_pb2
from sluice.convert import context_to_proto
from sluice.core import tracing
from sluice.core.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    Unavailable,
    from_rpc_error,
)
from sluice.core.logging import outgoing_metadata
from sluice.core.stage import StageBinding, StageResult, run_stage
from sluice.domain import Budget, Candidates, RankContext, StageName

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 30_000),
    # a stage that comes back is used again within half a second, not after gRPC's default
    # exponential back-off (up to 2 minutes): a call meanwhile fails fast and degrades
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    # Despite its name, gRPC core reads this as the least time a connection attempt gets
    # (its default). At 100 ms, a handshake that a loaded host or TLS slowed past it never
    # completed, and every call failed (tests/stages/test_stage_channel.py).
    ("grpc.min_reconnect_backoff_ms", 20_000),
]


class StageClient(Protocol):
    """One stage as the gateway calls it."""

    stage: StageName

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult: ...


class LocalStage:
    """A stage's engine (of build ``build_id``) in this process."""

    def __init__(self, stage: StageName, engine: Any, build_id: str = "") -> None:
        self.stage = stage
        self.engine = engine
        self.build_id = build_id

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        label = self.stage.label  # with tracing on: one INTERNAL span per stage
        with tracing.internal_span(f"stage {label}", {tracing.STAGE_ATTRIBUTE: label}):
            try:
                return run_stage(self.stage, self.engine, ctx, cands, budget, self.build_id)
            except InvalidArgument as err:  # as over gRPC (from_rpc_error): the gateway built
                # this context, so a stage refusing it degrades the stage, not the request
                raise Unavailable(f"{label} refused the request: {err.message}") from err


class _ContextMemo(threading.local):
    """The last context this thread converted: one request's four calls convert it once."""

    ctx: RankContext | None = None
    message: common_pb2.RankContext | None = None

    def proto(self, ctx: RankContext) -> common_pb2.RankContext:
        if self.ctx is not ctx or self.message is None:
            self.ctx, self.message = ctx, context_to_proto(ctx)
        return self.message


_MEMO = _ContextMemo()

KEEPER_REOPEN_S = 0.5
"""Wait before a keeper's ended watch is opened again (the stage restarted or refused it)."""


class SpinKeeper:
    """Keeps one health ``Watch`` open on a stage's channel, so that its calls start no thread.

    A gRPC channel drives its non-blocking calls (``.future()``, which the stage calls use so
    that a cancelled request cancels the call in flight) from a thread that exits as soon as
    the channel has none left. The gateway calls each stage once per request, so every call
    started a new thread: about 130 µs of client CPU per call (``docs/benchmarks.md``). An
    open watch keeps that thread alive. The stage's health service answers it without holding
    a handler thread (``sluice.core.health.HealthServicer``), so it costs the
    stage one stream. One idle thread here reads the watch (a stream's end is only seen once
    its messages are read) and opens it again :data:`KEEPER_REOPEN_S` after it ends.
    """

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self._watch = health_pb2_grpc.HealthStub(channel).Watch
        self._request = health_pb2.HealthCheckRequest(service=service)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call: Any = None
        self.opened = 0
        """How many watches were opened (tests)."""
        self._thread = threading.Thread(target=self._run, name="stage-channel-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                if self._closed.is_set():
                    return
                try:
                    self._call = call = self._watch(self._request, wait_for_ready=True)
                except ValueError:  # the channel was closed
                    return
                self.opened += 1
            try:
                for _ in call:  # status changes: only read, so that the end shows
                    pass
            except grpc.RpcError:
                pass  # the stage went away or refused the watch
            self._closed.wait(KEEPER_REOPEN_S)

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)


class GrpcStage:
    """A stage's service over gRPC; downstream failures become domain errors."""

    def __init__(
        self,
        binding: StageBinding,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        attempts: int = 3,
        packed: bool = False,
    ) -> None:
        """``address`` is a gRPC target (:mod:`sluice.balancer`): one ``host:port`` is called
        as it always was; several replicas get round_robin, health checks and up to
        ``attempts`` tries of a call that meets UNAVAILABLE. ``packed``: candidates travel
        as packed arrays both ways (CANDIDATE_ENCODING_PACKED; the stage must know them)."""
        self.stage = binding.stage
        self.binding = binding
        self.packed = packed
        self.target = parse_target(address)
        self._credentials = credentials
        options = channel_options(
            self.target,
            binding.service.full_name,
            attempts,
            CHANNEL_OPTIONS,
            tls=credentials is not None,
        )
        self.channel = self._dial(self.target.target, options)
        # with tracing on, each call gets a CLIENT span and carries its W3C trace context
        self._rpc: grpc.UnaryUnaryMultiCallable = tracing.traced_channel(self.channel).unary_unary(
            binding.path,
            request_serializer=binding.request.SerializeToString,
            response_deserializer=binding.response.FromString,
        )
        self._keeper = SpinKeeper(self.channel, binding.service.full_name)

    def _dial(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self._credentials, options=options)

    def close(self) -> None:
        self._keeper.close()
        self.channel.close()

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        timeout_s = budget.remaining_s()
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"no time left for {self.binding.name}")
        request = self.binding.encode(_MEMO.proto(ctx), cands, budget, self.packed)
        t0 = time.perf_counter()
        call = self._rpc.future(request, timeout=timeout_s, metadata=outgoing_metadata())
        if budget.cancellation is not None:  # the caller went away: so does this call
            budget.cancellation.on_cancel(call.cancel)
        try:
            response = call.result()
        except grpc.FutureCancelledError as err:
            raise Cancelled(f"the caller went away during {self.binding.name}") from err
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.binding.name) from err
        finally:
            if budget.cancellation is not None:
                budget.cancellation.forget(call.cancel)
        try:
            result = self.binding.decode(response)
        except InvalidArgument as err:  # the stage answered something unusable
            raise Unavailable(f"{self.binding.name} answered badly: {err.message}") from err
        # as seen by the caller: includes the network hop
        result.report.duration_us = int((time.perf_counter() - t0) * 1e6)
        return result

    def wait_for_build(self, build_id: str, timeout_s: float) -> None:
        """Block until every replica the gateway may call reports ``build_id`` loaded (its
        health service, under :func:`sluice.builds.health_name`); Unavailable if one does not
        within ``timeout_s``. The replicas are those of :func:`sluice.balancer.replica_addresses`:
        a fixed list's, or what a DNS name resolves to now; one that is down is waited for."""
        deadline = time.monotonic() + timeout_s
        if not self.target.balanced:
            self._watch_build(self.channel, build_id, timeout_s, self.target.address)
            return
        try:
            replicas = replica_addresses(self.target)
        except OSError as err:
            raise Unavailable(f"cannot resolve {self.target.address}: {err}") from err
        if not replicas:
            raise Unavailable(f"{self.target.address} names no replica")
        options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
        if self._credentials is not None and self.target.kind == "dns":
            # the certificates name the service, not each replica's address
            options.append(("grpc.ssl_target_name_override", self.target.host))
        for address in replicas:
            with self._dial(address, options) as channel:
                self._watch_build(channel, build_id, deadline - time.monotonic(), address)

    def _watch_build(
        self, channel: grpc.Channel, build_id: str, timeout_s: float, address: str
    ) -> None:
        request = health_pb2.HealthCheckRequest(service=health_name(build_id))
        waited = f"{self.binding.name} at {address} did not load build {build_id!r} in time"
        if timeout_s <= 0:
            raise Unavailable(waited)
        updates = health_pb2_grpc.HealthStub(channel).Watch(
            request, timeout=timeout_s, wait_for_ready=True
        )
        try:
            for update in updates:  # SERVICE_UNKNOWN until the stage has loaded the build
                if update.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            raise Unavailable(waited) from err
        finally:
            updates.cancel()
        raise Unavailable(f"{self.binding.name} at {address} ended the watch of {build_id!r}")
