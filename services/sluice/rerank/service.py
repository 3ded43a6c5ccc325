"""The re-ranking service: the generic stage servicer over ``sluice.rerank.v2``."""

from __future__ import annotations

from sluice.core.stage import StageBinding
from sluice.domain import StageName
from sluice.rerank.v2 import rerank_pb2

BINDING = StageBinding.of(StageName.RERANK, rerank_pb2, "RerankService")
