"""The recall service: the generic stage servicer over ``sluice.recall.v2``.

A process serves the whole catalog or a front over shards (``RecallService``), or one shard
of a sharded catalog (``RecallShardService``: :mod:`sluice.recall.shards`).
"""

from __future__ import annotations

from sluice.config import RecallSettings
from sluice.core.stage import StageBinding, StageLimits
from sluice.domain import StageName
from sluice.recall.v2 import recall_pb2

BINDING = StageBinding.of(StageName.RECALL, recall_pb2, "RecallService")
SHARD_BINDING = StageBinding.of(StageName.RECALL, recall_pb2, "RecallShardService")


def binding(settings: RecallSettings) -> StageBinding:
    return SHARD_BINDING if settings.shard is not None else BINDING


def limits(settings: RecallSettings) -> StageLimits:
    """A shard answers every source's list at once: up to SOURCE_LISTS times the budget."""
    from sluice.recall.shards import SOURCE_LISTS

    factor = SOURCE_LISTS if settings.shard is not None else 1
    return StageLimits(settings.max_candidates * factor, settings.deadline_ms / 1000)
