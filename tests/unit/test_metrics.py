"""HR/NDCG on hand-computable cases, history exclusion and the leave-one-out split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sluice.eval.metrics import evaluate, leave_one_out, list_recall, rank_metrics


def _metrics(
    scores: list[list[float]], targets: list[int], ks: tuple[int, ...]
) -> dict[str, list[float]]:
    out = rank_metrics(torch.tensor(scores), torch.tensor(targets), ks)
    return {k: v.tolist() for k, v in out.items()}


def test_rank_metrics_hand_cases() -> None:
    # target 0 is ranked first; target 3 has 3 items above it
    scores = [[9.0, 1.0, 2.0, 3.0], [9.0, 8.0, 7.0, 1.0]]
    m = _metrics(scores, [0, 3], (1, 3, 4))
    assert m["HR@1"] == [1.0, 0.0]
    assert m["HR@3"] == [1.0, 0.0]
    assert m["HR@4"] == [1.0, 1.0]
    assert m["NDCG@4"][0] == pytest.approx(1.0)
    assert m["NDCG@4"][1] == pytest.approx(1.0 / math.log2(5))
    assert m["NDCG@3"][1] == 0.0


def test_ties_are_broken_at_random_in_expectation() -> None:
    # the target ties with one other item at the top: rank 0 or 1 with equal chance
    m = _metrics([[5.0, 5.0, 1.0]], [1], (1, 2))
    assert m["HR@1"] == [pytest.approx(0.5)]
    assert m["HR@2"] == [pytest.approx(1.0)]
    assert m["NDCG@2"] == [pytest.approx(0.5 * (1.0 + 1.0 / math.log2(3)))]


def test_history_items_are_excluded_except_the_target() -> None:
    num_items = 6
    base = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # item i has rank i

    def score_fn(hist: list[np.ndarray]) -> np.ndarray:
        return np.tile(base, (len(hist), 1))

    # user 0: items 0, 1 in history -> target 3 moves from rank 3 to rank 1
    # user 1: the target 2 is itself in the history and must stay rankable
    histories = [np.array([0, 1]), np.array([2, 0])]
    targets = np.array([3, 2])
    m = evaluate(score_fn, histories, targets, ks=(1, 2), batch_size=1)
    assert m["HR@2"] == pytest.approx(1.0)  # both at rank 1
    assert m["HR@1"] == pytest.approx(0.0)
    assert m["NDCG@2"] == pytest.approx(1.0 / math.log2(3))
    assert m["users"] == 2
    unmasked = evaluate(score_fn, histories, targets, ks=(2,), exclude_history=False)
    assert unmasked["HR@2"] == pytest.approx(0.0)
    assert num_items == len(base)


def test_users_without_target_are_skipped() -> None:
    m = evaluate(lambda h: np.ones((len(h), 3)), [np.array([0]), np.array([1])], np.array([-1, 2]))
    assert m["users"] == 1


def test_leave_one_out_split() -> None:
    seqs = [np.array([4, 5, 6, 7]), np.array([1, 2, 3]), np.array([8, 9])]
    train, valid, test = leave_one_out(seqs)
    assert [t.tolist() for t in train] == [[4, 5], [1], [8, 9]]
    assert valid.tolist() == [6, 2, -1]
    assert test.tolist() == [7, 3, -1]


def test_list_recall() -> None:
    cands = np.array([[1, 2, -1], [3, 4, 5], [0, 0, 0]])
    assert list_recall(cands, np.array([2, 9, -1])) == pytest.approx(0.5)
