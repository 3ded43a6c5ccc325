"""How much can recall keep with the cascade's own signals? A learned scorer over every item.

``python -m sluice.eval.recall_ceiling --data ../shared/data/amazon-beauty``

Recall merges a few sources' lists into 1,000 candidates. This probe drops the lists: it
scores **every** catalog item with the coarse stage's recommendation signals (behaviour and
text similarity to the history, co-occurrence and its log, category affinity, popularity)
and keeps the top ``k``. What it keeps of the test targets bounds any merge of sources built
on those signals. It reports each signal alone, a logistic regression and gradient-boosted
trees (scikit-learn) over all of them.

Leak-free like the build's own fits: the models learn on other users' last history items
(validation targets) with :class:`~sluice.coarse.training.FittingView` counts, which leave
those items out; the test targets are scored with the build's tables. Uses the cached
holdout build of ``sluice eval recommend`` (built if missing).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice.coarse.engine import COLUMN, FeatureTables
from sluice.coarse.training import FittingView, home_context
from sluice.domain import Candidates
from sluice.eval.served import ensure_build, load_split, sample_users

SIGNALS = (
    "behaviour_sim",
    "history_text_sim",
    "cooc",
    "log_cooc",
    "category_affinity",
    "log_popularity",
)


def catalog_signals(tables: FeatureTables, history_rows: np.ndarray) -> np.ndarray:
    """[catalog rows, len(SIGNALS)]: every item's signals for a user with this history."""
    catalog = tables.catalog
    n = len(catalog)
    every = Candidates(catalog.item_ids, np.zeros(n, np.float32), np.zeros(n, np.int8))
    x = tables.features(home_context(catalog.item_ids[history_rows]), every)
    return x[:, [COLUMN[s] for s in SIGNALS]]


def kept(scores: np.ndarray, history_rows: np.ndarray, target: int, k: int) -> float:
    """Whether ``target`` is in the top ``k`` of ``scores`` with the history excluded; ties
    at the cut count in expectation (as :func:`sluice.eval.metrics.evaluate` does)."""
    s = scores.astype(np.float64)
    s[history_rows] = -np.inf
    t = s[target]
    if t == -np.inf:  # excluded with the history
        return 0.0
    above = int(np.count_nonzero(s > t))
    if above >= k:
        return 0.0
    tied = int(np.count_nonzero(s == t))  # the target among them
    return min(1.0, (k - above) / tied)


def run(
    data: Path, users: int, fit_users: int, negatives: int, k: int, seed: int
) -> dict[str, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    artifacts = ensure_build(data, holdout=1)
    split = load_split(data, artifacts)
    histories = split.histories
    rng = np.random.default_rng(seed)
    n = split.num_items

    # fit: another sample of users, target = their last history item, history = the rest
    view = FittingView.without_last_items(artifacts, histories)
    fitters = [u for u in range(len(histories)) if len(histories[u]) >= 3]
    xs, ys = [], []
    for u in rng.choice(fitters, min(fit_users, len(fitters)), replace=False).tolist():
        hist, target = histories[u][:-1], int(histories[u][-1])
        x = catalog_signals(view.tables, hist)
        pool = np.setdiff1d(np.arange(n), np.append(hist, target))
        neg = rng.choice(pool, min(negatives, len(pool)), replace=False)
        xs.append(x[np.append(target, neg)])
        ys.append(np.r_[1.0, np.zeros(len(neg))])
    x_fit, y_fit = np.concatenate(xs), np.concatenate(ys)
    models = {
        "logistic regression": LogisticRegression(max_iter=2000).fit(x_fit, y_fit),
        "gradient-boosted trees": HistGradientBoostingClassifier(
            max_iter=300, learning_rate=0.05, random_state=seed
        ).fit(x_fit, y_fit),
    }

    served = FeatureTables.from_artifacts(artifacts, lexical=False)
    test = sample_users(split, users, seed + 1)
    hits = dict.fromkeys([*SIGNALS, *models], 0.0)
    for u in test.tolist():
        hist, target = histories[u], int(split.test[u])
        x = catalog_signals(served, hist)
        for j, name in enumerate(SIGNALS):
            hits[name] += kept(x[:, j], hist, target, k)
        for name, model in models.items():
            hits[name] += kept(model.predict_proba(x)[:, 1], hist, target, k)
    return {
        "data": str(data),
        "test_users": len(test),
        "fit_requests": len(xs),
        "k": k,
        f"recall@{k}": {name: round(h / len(test), 4) for name, h in hits.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.eval.recall_ceiling")
    parser.add_argument("--data", type=Path, required=True, help="an amazon-beauty layout")
    parser.add_argument("--users", type=int, default=3000, help="sampled test users")
    parser.add_argument("--fit-users", type=int, default=3000)
    parser.add_argument("--negatives", type=int, default=200, help="random items per fit user")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.data, args.users, args.fit_users, args.negatives, args.k, args.seed)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
