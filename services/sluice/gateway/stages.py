"""The cascade's stages as the gateway calls them: over gRPC, or in this process.

Both kinds answer :meth:`StageClient.call` with a :class:`~sluice.core.stage.StageResult`;
the gateway cannot tell them apart, which is what makes the two layouts answer alike.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import grpc

from sluice.common.v1 import common_pb2
from sluice.convert import context_to_proto
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
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class StageClient(Protocol):
    """One stage as the gateway calls it."""

    stage: StageName

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult: ...


class LocalStage:
    """A stage's engine in this process."""

    def __init__(self, stage: StageName, engine: Any) -> None:
        self.stage = stage
        self.engine = engine

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        return run_stage(self.stage, self.engine, ctx, cands, budget)


class _ContextMemo(threading.local):
    """The last context this thread converted: one request's four calls convert it once."""

    ctx: RankContext | None = None
    message: common_pb2.RankContext | None = None

    def proto(self, ctx: RankContext) -> common_pb2.RankContext:
        if self.ctx is not ctx or self.message is None:
            self.ctx, self.message = ctx, context_to_proto(ctx)
        return self.message


_MEMO = _ContextMemo()


class GrpcStage:
    """A stage's service over gRPC; downstream failures become domain errors."""

    def __init__(
        self,
        binding: StageBinding,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.stage = binding.stage
        self.binding = binding
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._rpc: grpc.UnaryUnaryMultiCallable = self.channel.unary_unary(
            binding.path,
            request_serializer=binding.request.SerializeToString,
            response_deserializer=binding.response.FromString,
        )

    def close(self) -> None:
        self.channel.close()

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        timeout_s = budget.remaining_s()
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded(f"no time left for {self.binding.name}")
        request = self.binding.encode(_MEMO.proto(ctx), cands, budget)
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
