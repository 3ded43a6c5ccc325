"""Coarse ranking gRPC service."""

from __future__ import annotations

import time

import grpc

from sluice.artifacts import Artifacts
from sluice.coarse.scorer import CoarseRanker, FeatureTables, LinearWeights
from sluice.coarse.v1 import coarse_pb2, coarse_pb2_grpc
from sluice.config import CoarseSettings
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


class CoarseServicer(coarse_pb2_grpc.CoarseRankServiceServicer):
    def __init__(self, settings: CoarseSettings) -> None:
        self.settings = settings
        self.ranker: CoarseRanker | None = None

    def CoarseRank(  # noqa: N802
        self, request: coarse_pb2.CoarseRankRequest, context: grpc.ServicerContext
    ) -> coarse_pb2.CoarseRankResponse:
        if self.ranker is None:
            raise Unavailable("coarse ranking is warming up")
        keep = check_budget(request.max_candidates, "max_candidates", self.settings.max_candidates)
        cands = candidates_from_proto(request.candidates)
        if len(cands) > self.settings.max_candidates:
            raise InvalidArgument(
                f"at most {self.settings.max_candidates} candidates",
                field_path="candidates.item_ids",
            )
        ctx = context_from_stage_request(request)
        t0 = time.perf_counter()
        out = self.ranker.rank(ctx, cands, keep or 200)
        report = StageReport(
            StageName.COARSE_RANK, len(cands), len(out), int((time.perf_counter() - t0) * 1e6)
        )
        return coarse_pb2.CoarseRankResponse(
            candidates=candidates_to_proto(out), report=report_to_proto(report)
        )


def load_coarse_ranker(settings: CoarseSettings) -> CoarseRanker:
    """The ranker as the service runs it, warmed up."""
    artifacts = Artifacts(settings.artifacts)
    weights_path = artifacts.root / "coarse.json"
    weights = LinearWeights.load(weights_path) if weights_path.exists() else LinearWeights.default()
    ranker = CoarseRanker(FeatureTables.from_artifacts(artifacts), weights)
    ids = artifacts.catalog.item_ids[:50]
    ranker.rank(RankContext(history_item_ids=ids[:3]), Candidates(ids, ids * 0.0, ids * 0), 10)
    return ranker


def spec(settings: CoarseSettings) -> ServiceSpec:
    servicer = CoarseServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        coarse_pb2_grpc.add_CoarseRankServiceServicer_to_server(servicer, server)
        return [coarse_pb2.DESCRIPTOR.services_by_name["CoarseRankService"].full_name]

    def warmup() -> None:
        servicer.ranker = load_coarse_ranker(settings)

    return ServiceSpec("coarse", register, warmup)
