"""Fit the fine/coarse fusion weights by running the cascade in process."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from sluice.artifacts import Artifacts
from sluice.coarse.engine import CoarseEngine, LinearWeights
from sluice.coarse.training import FittingView
from sluice.domain import Budget, RankContext
from sluice.fine.backend import TorchBackend, model_id
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import FusionWeights, fit_beta, fit_signals, signal_matrix
from sluice.recall.engine import RecallEngine

RECALL_BUDGET = 1000
COARSE_KEEP = 200
# fewer held-out requests whose target survives to the fine stage than this: no signal
# weights (8 of them), recommendation fuses by beta
MIN_SIGNAL_SAMPLES = 200


def fit_fusion(
    artifacts: Artifacts,
    view: FittingView,
    recommend: Sequence[tuple[RankContext, int]],
    search: Sequence[tuple[RankContext, int]],
) -> FusionWeights:
    """Fusion weights on requests whose targets the view's counts do not include: a beta
    per task and, for recommendation, the weights of the signal fusion."""
    recaller = RecallEngine(view.recall)
    coarse = CoarseEngine(view.tables, LinearWeights.load(artifacts.root / "coarse.json"))
    backend = TorchBackend(artifacts.ranker_dir)
    fine = FineEngine(artifacts.catalog, backend)
    signal_samples: list[tuple[np.ndarray, int]] = []

    def samples(
        contexts: Sequence[tuple[RankContext, int]], desc: str, signals: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        out = []
        for ctx, target in tqdm(contexts, desc=desc, leave=False):
            recalled = recaller.retrieve(ctx, Budget(RECALL_BUDGET))
            cands = coarse.rank(ctx, recalled, Budget(COARSE_KEEP))
            hit = cands.item_ids == target
            if hit.any():
                scores = fine.model_scores(ctx, cands)
                out.append((scores, cands.scores, hit))
                if signals:
                    m = signal_matrix(scores, cands.scores, view.tables.features(ctx, cands))
                    signal_samples.append((m, int(np.flatnonzero(hit)[0])))
        return out

    weights = FusionWeights(
        recommend=fit_beta(samples(recommend, "fusion: recommend", signals=True)),
        search=fit_beta(samples(search, "fusion: search")),
    )
    if len(signal_samples) >= MIN_SIGNAL_SAMPLES:
        weights.signals = fit_signals(signal_samples)
        weights.signals_model = model_id(backend)
    return weights
