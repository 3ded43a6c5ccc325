"""One shape for every stage of the cascade.

A stage is an *engine* with one method: ``retrieve(ctx, budget)`` for recall, or
``rank(ctx, candidates, budget)`` for every later stage. Everything around it is
shared and lives here:

* :func:`run_stage` times the engine, cuts its output to the budget's window and writes
  the :class:`~sluice.domain.StageReport`; the one-machine gateway, eval and the gRPC
  servicer all call it, so every layout runs a stage the same way;
* :class:`StageBinding` is what a stage's ``service.py`` declares: its gRPC service and
  messages. The request messages all carry a :class:`sluice.common.v1.RankContext`, a
  ``max_candidates`` and, for ranking stages, ``candidates`` (and ``offset`` for the paged
  re-ranking stage), so one binding encodes and decodes any of them;
* :class:`StageServicer` serves any binding: warm-up gate, limits, the caller's deadline,
  the report and domain errors. It is transport-free behind :meth:`StageServicer.serve`
  (the gRPC handler only reads the deadline off the call), so an asyncio transport or
  admission control wraps it without touching a stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from sluice.builds import LoadedBuilds
from sluice.common.v1 import common_pb2
from sluice.convert import (
    candidates_from_proto,
    candidates_to_proto,
    check_range,
    context_from_proto,
    report_from_proto,
    report_to_proto,
)
from sluice.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from sluice.core.server import caller_timeout_s
from sluice.domain import Budget, Candidates, Gathered, RankContext, StageName, StageReport

MAX_OFFSET = 1_000_000


class Retriever(Protocol):
    """The recall stage's engine: candidates from the whole catalog."""

    @property
    def catalog_size(self) -> int: ...

    def retrieve(self, ctx: RankContext, budget: Budget) -> Candidates: ...


class Ranker(Protocol):
    """A ranking stage's engine: the given candidates, scored and ordered, best first."""

    def rank(self, ctx: RankContext, cands: Candidates, budget: Budget) -> Candidates: ...


@dataclass
class StageResult:
    """What one stage call returned: its window of candidates, how many it had, its report."""

    candidates: Candidates
    total_size: int
    report: StageReport


def run_stage(
    stage: StageName,
    engine: Any,
    ctx: RankContext,
    cands: Candidates | None,
    budget: Budget,
    build_id: str = "",
) -> StageResult:
    """Run one engine (of build ``build_id``) under ``budget`` (``cands`` None: retrieve)
    and report on it."""
    t0 = time.perf_counter()
    if cands is None:
        out = engine.retrieve(ctx, budget)
        n_in = int(engine.catalog_size)
    else:
        out = engine.rank(ctx, cands, budget)
        n_in = len(cands)
    page = out.window(budget.offset, budget.max_candidates)
    us = int((time.perf_counter() - t0) * 1e6)
    report = StageReport(stage, n_in, len(page), us, build_id=build_id)
    if isinstance(out, Gathered):  # a sharded catalog: a missing shard degrades the page
        report.shards = out.shards
        missing = [str(s.index) for s in out.shards if not s.answered]
        if missing:
            report.degraded = True
            report.degraded_reason = (
                f"recall shards {', '.join(missing)} of {len(out.shards)} did not answer; "
                "their items are missing"
            )
    return StageResult(page, len(out), report)


def _no_extras(engine: Any, response: Any, ctx: RankContext) -> None:
    return None


@dataclass(frozen=True)
class StageBinding:
    """A stage's gRPC service as the shape sees it; each stage's ``service.py`` declares one."""

    stage: StageName
    service: ServiceDescriptor
    request: type[Any]
    response: type[Any]
    annotate: Callable[[Any, Any, RankContext], None] = _no_extras
    """Fills response fields only this stage has (the fine stage's model version, which an
    experiment arm's context may choose)."""

    @classmethod
    def of(
        cls,
        stage: StageName,
        module: ModuleType,
        service: str,
        annotate: Callable[[Any, Any, RankContext], None] = _no_extras,
    ) -> StageBinding:
        """The binding of ``service`` in a generated ``*_pb2`` module (its one method)."""
        descriptor = module.DESCRIPTOR.services_by_name[service]
        (method,) = descriptor.methods
        request = getattr(module, method.input_type.name)
        response = getattr(module, method.output_type.name)
        return cls(stage, descriptor, request, response, annotate)

    @property
    def name(self) -> str:
        return self.stage.label

    @property
    def method(self) -> MethodDescriptor:
        (method,) = self.service.methods
        return method

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def retrieves(self) -> bool:
        """True for recall: its request carries no candidates."""
        return "candidates" not in self.request.DESCRIPTOR.fields_by_name

    @property
    def paged(self) -> bool:
        """True for re-ranking: its request places a page with an offset."""
        return "offset" in self.request.DESCRIPTOR.fields_by_name

    # -- the caller's side (the gateway) --------------------------------------------------
    @property
    def encodes(self) -> bool:
        """True when the request may ask for packed candidates in the response."""
        return "response_encoding" in self.request.DESCRIPTOR.fields_by_name

    def encode(
        self, context: Message, cands: Candidates | None, budget: Budget, packed: bool = False
    ) -> Any:
        """``packed``: candidates both ways as packed arrays (the stage must know them)."""
        req: Any = self.request(context=context, max_candidates=budget.max_candidates)
        packed = packed and self.encodes
        if cands is not None:
            req.candidates.CopyFrom(candidates_to_proto(cands, packed))
        if self.paged:
            req.offset = budget.offset
        if packed:
            req.response_encoding = common_pb2.CANDIDATE_ENCODING_PACKED
        return req

    def decode(self, response: Any) -> StageResult:
        cands = candidates_from_proto(response.candidates)
        total = int(response.total_size) if self.paged else len(cands)
        return StageResult(cands, total, report_from_proto(response.report))


@dataclass(frozen=True)
class StageLimits:
    """What a stage service accepts."""

    max_candidates: int
    """Largest ``max_candidates`` and most incoming candidates."""
    default_deadline_s: float
    """The budget of a call that set no deadline."""


def deadline_of(context: grpc.ServicerContext, default_s: float) -> float:
    """The call's deadline on :func:`time.monotonic`'s clock; the default when it set none."""
    remaining = caller_timeout_s(context)
    return time.monotonic() + (default_s if remaining is None else remaining)


@dataclass
class StageServicer:
    """Serves one stage's gRPC service from the engines of the builds it has loaded; each
    request is answered by the build its context names (the current one if none)."""

    binding: StageBinding
    limits: StageLimits
    builds: LoadedBuilds[Any]

    def add_to(self, server: grpc.Server) -> list[str]:
        """Register the handler; returns the full service name (for health and reflection)."""
        b = self.binding
        handler = grpc.unary_unary_rpc_method_handler(
            self.handle,
            request_deserializer=b.request.FromString,
            response_serializer=b.response.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(b.service.full_name, {b.method.name: handler}),)
        )
        return [b.service.full_name]

    def handle(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self.serve(request, deadline_of(context, self.limits.default_deadline_s))

    def serve(self, request: Any, deadline: float) -> Message:
        """Validate, run the engine before ``deadline`` (monotonic), build the response."""
        b, limit = self.binding, self.limits.max_candidates
        if not self.builds.current_id:
            raise Unavailable(f"{b.name} is warming up")
        keep = check_range(request.max_candidates, "max_candidates", 1, limit)
        offset = check_range(request.offset, "offset", 0, MAX_OFFSET) if b.paged else 0
        cands = None
        if not b.retrieves:
            if len(request.candidates.item_ids) > limit:
                raise InvalidArgument(
                    f"at most {limit} candidates", field_path="candidates.item_ids"
                )
            if len(request.candidates.item_ids_le) > 8 * limit:
                raise InvalidArgument(
                    f"at most {limit} candidates", field_path="candidates.item_ids_le"
                )
            cands = candidates_from_proto(request.candidates)
        packed = False
        if b.encodes:
            encoding = check_range(request.response_encoding, "response_encoding", 0, 1)
            packed = encoding == common_pb2.CANDIDATE_ENCODING_PACKED
        ctx = context_from_proto(request.context)
        build_id, engine = self.builds.get(ctx.build_id)
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{b.name}: the deadline passed before the work began")
        result = run_stage(b.stage, engine, ctx, cands, Budget(keep, deadline, offset), build_id)
        response: Any = b.response(
            candidates=candidates_to_proto(result.candidates, packed),
            report=report_to_proto(result.report),
        )
        if b.paged:
            response.total_size = result.total_size
        b.annotate(engine, response, ctx)
        return response
