"""The coarse ranking service: the generic stage servicer over ``sluice.coarse.v2``."""

from __future__ import annotations

from sluice.coarse.v2 import coarse_pb2
from sluice.core.stage import StageBinding
from sluice.domain import StageName

BINDING = StageBinding.of(StageName.COARSE_RANK, coarse_pb2, "CoarseRankService")
