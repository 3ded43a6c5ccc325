"""The recall service: the generic stage servicer over ``sluice.recall.v2``."""

from __future__ import annotations

from sluice.core.stage import StageBinding
from sluice.domain import StageName
from sluice.recall.v2 import recall_pb2

BINDING = StageBinding.of(StageName.RECALL, recall_pb2, "RecallService")
