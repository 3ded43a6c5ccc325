"""Fine ranking gRPC service: the transformer on Triton behind a thin servicer."""

from __future__ import annotations

import time

import grpc

from sluice.artifacts import Artifacts
from sluice.config import FineSettings
from sluice.convert import (
    candidates_from_proto,
    candidates_to_proto,
    check_budget,
    context_from_stage_request,
    report_to_proto,
)
from sluice.core.errors import InvalidArgument, Unavailable
from sluice.core.server import ServiceSpec
from sluice.domain import Candidates, RankContext, StageName, StageReport
from sluice.fine.fusion import FusionWeights
from sluice.fine.scorer import FineStage, RankerBackend, TorchBackend, TritonBackend
from sluice.fine.v1 import fine_pb2, fine_pb2_grpc


class FineServicer(fine_pb2_grpc.FineRankServiceServicer):
    def __init__(self, settings: FineSettings) -> None:
        self.settings = settings
        self.stage: FineStage | None = None

    def FineRank(  # noqa: N802
        self, request: fine_pb2.FineRankRequest, context: grpc.ServicerContext
    ) -> fine_pb2.FineRankResponse:
        if self.stage is None:
            raise Unavailable("fine ranking is warming up")
        keep = check_budget(request.max_candidates, "max_candidates", self.settings.max_candidates)
        cands = candidates_from_proto(request.candidates)
        if len(cands) > self.settings.max_candidates:
            raise InvalidArgument(
                f"at most {self.settings.max_candidates} candidates",
                field_path="candidates.item_ids",
            )
        ctx = context_from_stage_request(request)
        remaining = context.time_remaining()
        t0 = time.perf_counter()
        out = self.stage.rank(ctx, cands, keep, timeout_s=remaining)
        report = StageReport(
            StageName.FINE_RANK, len(cands), len(out), int((time.perf_counter() - t0) * 1e6)
        )
        return fine_pb2.FineRankResponse(
            candidates=candidates_to_proto(out),
            model_version=self.stage.backend.version,
            report=report_to_proto(report),
        )


def make_backend(settings: FineSettings, artifacts: Artifacts) -> RankerBackend:
    if settings.backend == "torch":
        return TorchBackend(artifacts.ranker_dir, threads=settings.torch_threads)
    return TritonBackend(settings.triton_url, settings.model_name, artifacts.ranker_version)


def load_fine_stage(settings: FineSettings) -> FineStage:
    """The stage as the service runs it, warmed up (waits for Triton to serve the model)."""
    artifacts = Artifacts(settings.artifacts)
    fusion = FusionWeights.load(artifacts.root / "fusion.json")
    backend = make_backend(settings, artifacts)
    if isinstance(backend, TritonBackend):
        backend.wait_ready(settings.triton_wait_s)
    stage = FineStage(artifacts.catalog, backend, fusion)
    ids = artifacts.catalog.item_ids[:20]
    for _ in range(3):  # first Triton executions are slow
        stage.rank(RankContext(history_item_ids=ids[:5]), Candidates(ids, ids * 0.0, ids * 0), 10)
    return stage


def spec(settings: FineSettings) -> ServiceSpec:
    servicer = FineServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        fine_pb2_grpc.add_FineRankServiceServicer_to_server(servicer, server)
        return [fine_pb2.DESCRIPTOR.services_by_name["FineRankService"].full_name]

    def warmup() -> None:
        servicer.stage = load_fine_stage(settings)

    return ServiceSpec("fine", register, warmup)
