"""Fit the coarse ranker's weights on recall's own candidates.

Recommendation: for sampled users, history = all but the last training item,
label = the candidate is that last item. Search: pseudo-queries (a few words of
an item's title) labelled with that item. Negatives are subsampled per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from sluice.artifacts import Artifacts
from sluice.coarse.engine import FeatureTables, LinearWeights, fit_weights
from sluice.domain import Budget, RankContext, RequestKind, Surface
from sluice.recall.engine import RecallAssets, RecallEngine, StaticPopularity

COOC_TOP_K = 100  # co-occurrence neighbours kept per item for recall


@dataclass
class FittingView:
    """Recall assets and coarse feature tables to fit on: counts without the fitting targets.

    Fitting requests target each user's last item (:func:`training_contexts`). The served
    tables count that very interaction, so popularity and co-occurrence would see the answer:
    the fitted weights would trust them far more than they deserve when serving, where the
    next item is never in the counts yet. This view recounts both without each user's last
    item; everything else (vectors, lexical index) is the build's own.
    """

    recall: RecallAssets
    tables: FeatureTables

    @classmethod
    def without_last_items(
        cls, artifacts: Artifacts, sequences: Sequence[np.ndarray]
    ) -> FittingView:
        from sluice.eval.baselines import CoocModel

        n = len(artifacts.catalog)
        before = [s[:-1] for s in sequences]
        rows = np.concatenate(before) if before else np.zeros(0, dtype=np.int64)
        popularity = np.bincount(rows, minlength=n).astype(np.float32)
        cooc = CoocModel.fit(before, n)
        top_rows, top_scores = cooc.topk(COOC_TOP_K)
        recall = replace(
            RecallAssets.from_artifacts(artifacts),
            cooc_rows=top_rows,
            cooc_scores=top_scores,
            popularity=StaticPopularity(popularity),
        )
        tables = replace(
            FeatureTables.from_artifacts(artifacts), cooc=cooc.matrix, popularity=popularity
        )
        return cls(recall, tables)


def home_context(history: np.ndarray) -> RankContext:
    """A home-page request of a user with this history, as the gateway builds it."""
    return RankContext(
        RequestKind.RECOMMEND,
        Surface.HOME,
        history_item_ids=history,
        exclude_item_ids=history,
    )


NEGATIVES_PER_REQUEST = 40
RECALL_BUDGET = 1000


def _sample(
    recaller: RecallEngine,
    tables: FeatureTables,
    contexts: Sequence[tuple[RankContext, int]],
    rng: np.random.Generator,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for ctx, target in tqdm(contexts, desc=desc, leave=False):
        cands = recaller.retrieve(ctx, Budget(RECALL_BUDGET))
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


def training_contexts(
    artifacts: Artifacts,
    sequences: Sequence[np.ndarray],
    num_requests: int,
    seed: int,
    pseudo: np.ndarray | None,
) -> tuple[list[tuple[RankContext, int]], list[tuple[RankContext, int]]]:
    """Held-out (context, target item id) pairs for recommendation and for search.

    Recommendation: a user's last training item is the target and the rest the
    history (the ranker never trained on that target). Search: a pseudo-query
    made of a few words of an item's title targets that item.
    """
    from sluice.fine.train import pseudo_query_texts

    rng = np.random.default_rng(seed)
    catalog = artifacts.catalog
    recommend: list[tuple[RankContext, int]] = []
    users = [i for i, s in enumerate(sequences) if len(s) >= 2]
    if users:
        for u in rng.choice(users, min(num_requests, len(users)), replace=False).tolist():
            seq = sequences[u]
            hist = catalog.item_ids[seq[:-1]]
            target = int(catalog.item_ids[seq[-1]])
            recommend.append((home_context(hist), target))
    search: list[tuple[RankContext, int]] = []
    if pseudo is not None:
        per_item = pseudo.shape[1]
        texts = pseudo_query_texts(catalog.titles, per_item, seed)
        for r in rng.choice(len(catalog), min(num_requests, len(catalog)), replace=False).tolist():
            v = int(rng.integers(per_item))
            ctx = RankContext(
                RequestKind.SEARCH,
                query=texts[r * per_item + v],
                query_embedding=pseudo[r + 1, v],
            )
            search.append((ctx, int(catalog.item_ids[r])))
    return recommend, search


def fit_coarse(
    view: FittingView,
    recommend: Sequence[tuple[RankContext, int]],
    search: Sequence[tuple[RankContext, int]],
    seed: int = 0,
) -> LinearWeights:
    """Weights for recommendation and search; the defaults where there is no signal."""
    rng = np.random.default_rng(seed)
    recaller = RecallEngine(view.recall)
    tables = view.tables
    weights = LinearWeights.default()
    if recommend:
        x, y = _sample(recaller, tables, recommend, rng, "coarse: recommend")
        if 0 < y.sum() < len(y):
            weights.recommend = fit_weights(x, y, seed)
    if search:
        x, y = _sample(recaller, tables, search, rng, "coarse: search")
        if 0 < y.sum() < len(y):
            weights.search = fit_weights(x, y, seed)
    return weights
