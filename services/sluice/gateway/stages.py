"""The cascade's stages as the gateway calls them: over gRPC, or in this process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from sluice.coarse.scorer import CoarseRanker
from sluice.coarse.v1 import coarse_pb2, coarse_pb2_grpc
from sluice.convert import (
    candidates_from_proto,
    candidates_to_proto,
    filters_to_proto,
    report_from_proto,
)
from sluice.core.errors import from_rpc_error
from sluice.core.logging import outgoing_metadata
from sluice.domain import Candidates, RankContext, StageName, StageReport
from sluice.fine.scorer import FineStage
from sluice.fine.v1 import fine_pb2, fine_pb2_grpc
from sluice.recall.engine import Recaller
from sluice.recall.v1 import recall_pb2, recall_pb2_grpc
from sluice.rerank.engine import Reranker
from sluice.rerank.v1 import rerank_pb2, rerank_pb2_grpc

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 30_000),
]


def _query_fields(ctx: RankContext) -> dict[str, object]:
    emb = ctx.query_embedding
    return {"query": ctx.query, "query_embedding": emb.tolist() if emb is not None else []}


class GrpcStages:
    """Stage clients over gRPC; downstream failures become domain errors."""

    def __init__(self, recall: str, coarse: str, fine: str, rerank: str) -> None:
        self._channels = [
            grpc.insecure_channel(a, options=CHANNEL_OPTIONS)
            for a in (recall, coarse, fine, rerank)
        ]
        self._recall = recall_pb2_grpc.RecallServiceStub(self._channels[0])
        self._coarse = coarse_pb2_grpc.CoarseRankServiceStub(self._channels[1])
        self._fine = fine_pb2_grpc.FineRankServiceStub(self._channels[2])
        self._rerank = rerank_pb2_grpc.RerankServiceStub(self._channels[3])

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    @staticmethod
    def _call(name: str, fn: Callable[..., T], request: object, timeout_s: float) -> tuple[T, int]:
        t0 = time.perf_counter()
        try:
            response = fn(request, timeout=timeout_s, metadata=outgoing_metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err, name) from err
        return response, int((time.perf_counter() - t0) * 1e6)

    @staticmethod
    def _report(msg: object, wall_us: int) -> StageReport:
        report = report_from_proto(msg)  # type: ignore[arg-type]
        report.duration_us = wall_us  # as seen by the caller: includes the network hop
        return report

    def recall(
        self, ctx: RankContext, max_candidates: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        req = recall_pb2.RecallRequest(
            history_item_ids=ctx.history_item_ids.tolist(),
            context_item_id=ctx.context_item_id,
            filters=filters_to_proto(ctx.filters),
            exclude_item_ids=ctx.exclude_item_ids.tolist(),
            max_candidates=max_candidates,
            **_query_fields(ctx),  # type: ignore[arg-type]
        )
        resp, us = self._call("recall", self._recall.Recall, req, timeout_s)
        return candidates_from_proto(resp.candidates), self._report(resp.report, us)

    def coarse(
        self, ctx: RankContext, cands: Candidates, keep: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        req = coarse_pb2.CoarseRankRequest(
            history_item_ids=ctx.history_item_ids.tolist(),
            candidates=candidates_to_proto(cands),
            max_candidates=keep,
            context_item_id=ctx.context_item_id,
            **_query_fields(ctx),  # type: ignore[arg-type]
        )
        resp, us = self._call("coarse", self._coarse.CoarseRank, req, timeout_s)
        return candidates_from_proto(resp.candidates), self._report(resp.report, us)

    def fine(
        self, ctx: RankContext, cands: Candidates, keep: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        req = fine_pb2.FineRankRequest(
            history_item_ids=ctx.history_item_ids.tolist(),
            candidates=candidates_to_proto(cands),
            max_candidates=keep,
            **_query_fields(ctx),  # type: ignore[arg-type]
        )
        resp, us = self._call("fine", self._fine.FineRank, req, timeout_s)
        return candidates_from_proto(resp.candidates), self._report(resp.report, us)

    def rerank(
        self, ctx: RankContext, cands: Candidates, offset: int, page_size: int, timeout_s: float
    ) -> tuple[Candidates, int, StageReport]:
        req = rerank_pb2.RerankRequest(
            candidates=candidates_to_proto(cands),
            filters=filters_to_proto(ctx.filters),
            exclude_item_ids=ctx.exclude_item_ids.tolist(),
            offset=offset,
            page_size=page_size,
        )
        resp, us = self._call("rerank", self._rerank.Rerank, req, timeout_s)
        return (
            candidates_from_proto(resp.candidates),
            resp.total_size,
            self._report(resp.report, us),
        )


class LocalStages:
    """The same stages called in this process, without gRPC."""

    def __init__(
        self, recaller: Recaller, coarse: CoarseRanker, fine: FineStage, reranker: Reranker
    ) -> None:
        self.recaller = recaller
        self.coarse_ranker = coarse
        self.fine_stage = fine
        self.reranker = reranker

    @staticmethod
    def _timed(stage: StageName, n_in: int, t0: float, n_out: int) -> StageReport:
        return StageReport(stage, n_in, n_out, int((time.perf_counter() - t0) * 1e6))

    def recall(
        self, ctx: RankContext, max_candidates: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        t0 = time.perf_counter()
        out = self.recaller.recall(ctx, max_candidates).candidates
        return out, self._timed(StageName.RECALL, len(self.recaller.assets.catalog), t0, len(out))

    def coarse(
        self, ctx: RankContext, cands: Candidates, keep: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        t0 = time.perf_counter()
        out = self.coarse_ranker.rank(ctx, cands, keep)
        return out, self._timed(StageName.COARSE_RANK, len(cands), t0, len(out))

    def fine(
        self, ctx: RankContext, cands: Candidates, keep: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        t0 = time.perf_counter()
        out = self.fine_stage.rank(ctx, cands, keep, timeout_s=timeout_s)
        return out, self._timed(StageName.FINE_RANK, len(cands), t0, len(out))

    def rerank(
        self, ctx: RankContext, cands: Candidates, offset: int, page_size: int, timeout_s: float
    ) -> tuple[Candidates, int, StageReport]:
        t0 = time.perf_counter()
        page = self.reranker.rerank(ctx, cands, offset, page_size)
        return (
            page.candidates,
            page.total_size,
            self._timed(StageName.RERANK, len(cands), t0, len(page.candidates)),
        )
