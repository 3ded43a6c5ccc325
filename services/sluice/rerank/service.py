"""Re-ranking gRPC service."""

from __future__ import annotations

import time

import grpc

from sluice.artifacts import Artifacts
from sluice.config import RerankSettings
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
from sluice.rerank.engine import RerankConfig, Reranker
from sluice.rerank.v1 import rerank_pb2, rerank_pb2_grpc


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, settings: RerankSettings) -> None:
        self.settings = settings
        self.reranker: Reranker | None = None

    def Rerank(  # noqa: N802
        self, request: rerank_pb2.RerankRequest, context: grpc.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        if self.reranker is None:
            raise Unavailable("re-ranking is warming up")
        cands = candidates_from_proto(request.candidates)
        if len(cands) > self.settings.max_candidates:
            raise InvalidArgument(
                f"at most {self.settings.max_candidates} candidates",
                field_path="candidates.item_ids",
            )
        check_budget(request.offset, "offset", 1_000_000)
        if request.page_size <= 0:
            raise InvalidArgument("must be positive", field_path="page_size")
        check_budget(request.page_size, "page_size", self.settings.max_candidates)
        lam = request.diversity_lambda if request.HasField("diversity_lambda") else None
        if lam is not None and not 0.0 <= lam <= 1.0:
            raise InvalidArgument("must be within [0, 1]", field_path="diversity_lambda")
        ctx = context_from_stage_request(request)
        t0 = time.perf_counter()
        page = self.reranker.rerank(ctx, cands, request.offset, request.page_size, lam)
        report = StageReport(
            StageName.RERANK,
            len(cands),
            len(page.candidates),
            int((time.perf_counter() - t0) * 1e6),
        )
        return rerank_pb2.RerankResponse(
            candidates=candidates_to_proto(page.candidates),
            total_size=page.total_size,
            report=report_to_proto(report),
        )


def load_reranker(settings: RerankSettings) -> Reranker:
    """The re-ranker as the service runs it, warmed up."""
    artifacts = Artifacts(settings.artifacts)
    config = RerankConfig(settings.diversity_lambda, settings.max_per_brand)
    reranker = Reranker(artifacts.catalog, artifacts.text_vectors, config)
    ids = artifacts.catalog.item_ids[:30]
    reranker.rerank(RankContext(), Candidates(ids, ids * 1.0, ids * 0), 0, 10)
    return reranker


def spec(settings: RerankSettings) -> ServiceSpec:
    servicer = RerankServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        rerank_pb2_grpc.add_RerankServiceServicer_to_server(servicer, server)
        return [rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name]

    def warmup() -> None:
        servicer.reranker = load_reranker(settings)

    return ServiceSpec("rerank", register, warmup)
