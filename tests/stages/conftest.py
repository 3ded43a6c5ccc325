from __future__ import annotations

import pytest

from sluice.artifacts import Artifacts
from sluice.coarse.scorer import CoarseRanker, FeatureTables, LinearWeights
from sluice.embed.text import MiniLMEncoder
from sluice.fine.fusion import FusionWeights
from sluice.fine.scorer import FineStage, TorchBackend
from sluice.gateway.stages import LocalStages
from sluice.recall.engine import RecallAssets, Recaller
from sluice.rerank.engine import Reranker


@pytest.fixture(scope="session")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="session")
def recaller(tiny_artifacts: Artifacts) -> Recaller:
    return Recaller(RecallAssets.from_artifacts(tiny_artifacts))


@pytest.fixture(scope="session")
def local_stages(tiny_artifacts: Artifacts, recaller: Recaller) -> LocalStages:
    a = tiny_artifacts
    return LocalStages(
        recaller,
        CoarseRanker(FeatureTables.from_artifacts(a), LinearWeights.load(a.root / "coarse.json")),
        FineStage(
            a.catalog, TorchBackend(a.ranker_dir), FusionWeights.load(a.root / "fusion.json")
        ),
        Reranker(a.catalog, a.text_vectors),
    )
