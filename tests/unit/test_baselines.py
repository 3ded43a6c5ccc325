"""Co-occurrence finds a planted pattern; popularity counts only what it is fitted on."""

from __future__ import annotations

import numpy as np

from sluice.eval.baselines import CoocModel, PopularityModel
from sluice.eval.metrics import evaluate, leave_one_out


def _planted(num_users: int = 200, num_items: int = 30, seed: int = 0) -> list[np.ndarray]:
    """Random sequences in which item 5 is always directly followed by item 7."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_users):
        seq: list[int] = []
        while len(seq) < 8:
            item = int(rng.choice([i for i in range(num_items) if i != 7]))
            seq += [5, 7] if item == 5 else [item]
        out.append(np.array(seq))
    return out


def test_cooc_finds_planted_pattern() -> None:
    seqs = _planted()
    model = CoocModel.fit(seqs, 30, window=3)
    rows, scores = model.neighbours([5], k=3)
    assert rows[0, 0] == 7
    assert scores[0, 0] > scores[0, 1]
    table_rows, table_scores = model.topk(4)
    assert table_rows.shape == (30, 4)
    assert table_scores.shape == (30, 4)
    assert table_rows[5, 0] == 7
    # as a next-item recommender: after 5, the next item is 7
    hist = [np.array([1, 2, 5])]
    m = evaluate(model.scores, hist, np.array([7]), ks=(1,))
    assert m["HR@1"] == 1.0


def test_cooc_neighbours_pad_unseen_items() -> None:
    model = CoocModel.fit([np.array([0, 1, 2])], 5, window=1)
    rows, scores = model.neighbours([4], k=2)
    assert rows.tolist() == [[-1, -1]]
    assert scores.tolist() == [[0.0, 0.0]]


def test_popularity_counts_only_training_data() -> None:
    # item 9 occurs only as test targets, item 8 only as validation targets
    seqs = [np.array([1, 2, 1, 8, 9]), np.array([1, 3, 8, 9]), np.array([2, 2, 8, 9])]
    train, _valid, test = leave_one_out(seqs)
    pop = PopularityModel.fit(train, 10)
    assert pop.counts[9] == 0
    assert pop.counts[8] == 0
    assert pop.counts[1] == 3
    assert pop.counts[2] == 3
    assert pop.scores(train).shape == (3, 10)
    # with train counts the test target 9 cannot be ranked above items seen in training
    m = evaluate(pop.scores, train, test, ks=(1,))
    assert m["HR@1"] == 0.0
