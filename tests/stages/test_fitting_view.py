"""The coarse and fusion fits never see their own targets in the counts they fit on."""

from __future__ import annotations

import numpy as np

from sluice.artifacts import Artifacts
from sluice.coarse.training import FittingView, training_contexts
from sluice.eval.baselines import COOC_WINDOW


def _sequences(a: Artifacts) -> list[np.ndarray]:
    _, histories = a.users()
    return [a.catalog.rows(h) for h in histories]


def test_view_counts_leave_out_each_users_last_item(tiny_artifacts: Artifacts) -> None:
    a = tiny_artifacts
    sequences = _sequences(a)
    view = FittingView.without_last_items(a, sequences)

    served_pop = a.popularity
    last = np.bincount([s[-1] for s in sequences if len(s)], minlength=len(a.catalog))
    assert np.array_equal(view.tables.popularity, served_pop - last)

    # a (second-last -> last) transition seen nowhere else is in the served co-occurrence
    # and absent from the view's
    earlier: set[tuple[int, int]] = set()
    for s in sequences:
        body = s[:-1].tolist()
        for d in range(1, COOC_WINDOW + 1):
            for x, y in zip(body[:-d], body[d:], strict=False):
                earlier |= {(x, y), (y, x)}
    only_last = [
        (int(s[-2]), int(s[-1]))
        for s in sequences
        if len(s) >= 2 and s[-2] != s[-1] and (int(s[-2]), int(s[-1])) not in earlier
    ]
    assert only_last
    served = a.cooc[0]
    for prev, nxt in only_last[:20]:
        assert served[prev, nxt] > 0
        assert view.tables.cooc[prev, nxt] == 0
    assert view.recall.behaviour_vectors is a.behaviour_vectors


def test_recommend_fitting_targets_are_the_last_items(tiny_artifacts: Artifacts) -> None:
    a = tiny_artifacts
    sequences = _sequences(a)
    rec, _ = training_contexts(a, sequences, 50, seed=0, pseudo=None)
    last_items = {int(a.catalog.item_ids[s[-1]]) for s in sequences if len(s) >= 2}
    assert rec and all(target in last_items for _, target in rec)
