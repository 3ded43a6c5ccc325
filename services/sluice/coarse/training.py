"""Fit the coarse ranker's weights on recall's own candidates.

Recommendation: for sampled users, history = all but the last training item,
label = the candidate is that last item. Search: pseudo-queries (a few words of
an item's title) labelled with that item. Negatives are subsampled per request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from sluice.artifacts import Artifacts
from sluice.coarse.scorer import FeatureTables, LinearWeights, fit_weights
from sluice.domain import RankContext
from sluice.recall.engine import Recaller, RecallAssets

NEGATIVES_PER_REQUEST = 40
RECALL_BUDGET = 1000


def _sample(
    recaller: Recaller,
    tables: FeatureTables,
    contexts: Sequence[tuple[RankContext, int]],
    rng: np.random.Generator,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for ctx, target in tqdm(contexts, desc=desc, leave=False):
        cands = recaller.recall(ctx, RECALL_BUDGET).candidates
        label = cands.item_ids == target
        neg = np.flatnonzero(~label)
        pick = np.concatenate(
            [
                np.flatnonzero(label),
                rng.choice(neg, min(len(neg), NEGATIVES_PER_REQUEST), replace=False),
            ]
        )
        xs.append(tables.features(ctx, cands.take(pick)))
        ys.append(label[pick])
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def fit_coarse(
    artifacts: Artifacts,
    sequences: Sequence[np.ndarray],
    num_users: int,
    seed: int = 0,
    pseudo: np.ndarray | None = None,
) -> LinearWeights:
    """Weights for recommendation and search; defaults where there is no signal."""
    from sluice.fine.train import pseudo_query_texts

    rng = np.random.default_rng(seed)
    catalog = artifacts.catalog
    recaller = Recaller(RecallAssets.from_artifacts(artifacts))
    tables = FeatureTables.from_artifacts(artifacts)
    weights = LinearWeights.default()

    users = [i for i, s in enumerate(sequences) if len(s) >= 2]
    if users:
        chosen = rng.choice(users, min(num_users, len(users)), replace=False)
        contexts = []
        for u in chosen.tolist():
            seq = sequences[u]
            hist = catalog.item_ids[seq[:-1]]
            contexts.append(
                (
                    RankContext(history_item_ids=hist, exclude_item_ids=hist),
                    int(catalog.item_ids[seq[-1]]),
                )
            )
        x, y = _sample(recaller, tables, contexts, rng, "coarse: recommend")
        if 0 < y.sum() < len(y):
            weights.recommend = fit_weights(x, y, seed)

    if pseudo is not None:
        rows = rng.choice(len(catalog), min(num_users, len(catalog)), replace=False)
        texts = pseudo_query_texts(catalog.titles, pseudo.shape[1], seed)
        contexts = [
            (
                RankContext(query=texts[r * pseudo.shape[1]], query_embedding=pseudo[r + 1, 0]),
                int(catalog.item_ids[r]),
            )
            for r in rows.tolist()
        ]
        x, y = _sample(recaller, tables, contexts, rng, "coarse: search")
        if 0 < y.sum() < len(y):
            weights.search = fit_weights(x, y, seed)
    return weights
