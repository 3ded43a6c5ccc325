"""The fine ranking service: the generic stage servicer over ``sluice.fine.v2``."""

from __future__ import annotations

from typing import Any

from sluice.core.stage import StageBinding
from sluice.domain import RankContext, StageName
from sluice.fine.v2 import fine_pb2


def _model_version(
    engine: Any, response: fine_pb2.RankCandidatesResponse, ctx: RankContext
) -> None:
    # empty when no model scored them (sluice.fine.engine.FineEngine.runs_model)
    response.model_version = engine.backend_for(ctx).version if engine.runs_model(ctx) else ""


BINDING = StageBinding.of(StageName.FINE_RANK, fine_pb2, "FineRankService", _model_version)
