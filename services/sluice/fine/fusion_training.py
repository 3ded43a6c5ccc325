"""Fit the fine/coarse fusion weights by running the cascade in process."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from sluice.artifacts import Artifacts
from sluice.coarse.engine import CoarseEngine, LinearWeights
from sluice.coarse.training import FittingView
from sluice.domain import Budget, RankContext
from sluice.fine.backend import TorchBackend
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import FusionWeights, fit_beta
from sluice.recall.engine import RecallEngine

RECALL_BUDGET = 1000
COARSE_KEEP = 200


def fit_fusion(
    artifacts: Artifacts,
    view: FittingView,
    recommend: Sequence[tuple[RankContext, int]],
    search: Sequence[tuple[RankContext, int]],
) -> FusionWeights:
    """Fusion weights on requests whose targets the view's counts do not include."""
    recaller = RecallEngine(view.recall)
    coarse = CoarseEngine(view.tables, LinearWeights.load(artifacts.root / "coarse.json"))
    fine = FineEngine(artifacts.catalog, TorchBackend(artifacts.ranker_dir))

    def samples(
        contexts: Sequence[tuple[RankContext, int]], desc: str
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        out = []
        for ctx, target in tqdm(contexts, desc=desc, leave=False):
            recalled = recaller.retrieve(ctx, Budget(RECALL_BUDGET))
            cands = coarse.rank(ctx, recalled, Budget(COARSE_KEEP))
            hit = cands.item_ids == target
            if hit.any():
                out.append((fine.model_scores(ctx, cands), cands.scores, hit))
        return out

    return FusionWeights(
        recommend=fit_beta(samples(recommend, "fusion: recommend")),
        search=fit_beta(samples(search, "fusion: search")),
    )
