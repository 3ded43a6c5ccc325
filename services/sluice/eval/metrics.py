"""Offline ranking metrics with full ranking over the catalog.

Protocol: leave-one-out by time. For every user the scorer ranks *all* catalog
items; items already in the user's history are excluded (their scores set to
-inf) except the target itself. HR@K and NDCG@K use the target's rank; ties
are broken uniformly at random *in expectation* (exact expected values), so
constant-score baselines are neither flattered nor punished.

Item ids here are catalog rows (0-based); models that use dense indices map
them (``row + 1``) inside their score function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sluice.data.interactions import Interactions

KS: tuple[int, ...] = (10, 20, 50)

# histories (catalog rows, time order) [, per-user extras] -> scores [B, num_items] over rows
ScoreFn = Callable[..., np.ndarray | torch.Tensor]


def leave_one_out(
    data: Interactions | Sequence[np.ndarray],
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Split each user's sequence: ``(train sequences, valid targets, test targets)``.

    The last item is the test target, the second last the validation target and
    the rest is training. Users with fewer than 3 interactions keep everything
    for training and get target -1 (skipped by :func:`evaluate`).
    """
    sequences = data.sequences() if isinstance(data, Interactions) else list(data)
    train: list[np.ndarray] = []
    valid = np.full(len(sequences), -1, dtype=np.int64)
    test = np.full(len(sequences), -1, dtype=np.int64)
    for u, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < 3:
            train.append(seq)
            continue
        train.append(seq[:-2])
        valid[u] = seq[-2]
        test[u] = seq[-1]
    return train, valid, test


def rank_metrics(
    scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = KS
) -> dict[str, torch.Tensor]:
    """Per-user expected HR@K and NDCG@K from masked scores ``[B, N]`` and targets ``[B]``."""
    target_score = scores.gather(1, targets.unsqueeze(1))
    greater = (scores > target_score).sum(1).to(torch.float64)
    ties = ((scores == target_score).sum(1) - 1).to(torch.float64)  # other items tied
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        disc = torch.tensor([0.0] + [1.0 / math.log2(r + 2) for r in range(k)], dtype=torch.float64)
        cum = disc.cumsum(0)  # cum[r] = sum of discounts of ranks < r
        lo = greater.clamp(max=k)
        hi = (greater + ties + 1).clamp(max=k)
        out[f"HR@{k}"] = (hi - lo) / (ties + 1)
        out[f"NDCG@{k}"] = (cum[hi.long()] - cum[lo.long()]) / (ties + 1)
    return out


def mask_history(
    scores: torch.Tensor, histories: Sequence[np.ndarray], targets: torch.Tensor
) -> torch.Tensor:
    """Set the scores of history items to -inf, except each user's target (in place)."""
    lengths = [len(h) for h in histories]
    if sum(lengths) == 0:
        return scores
    rows = torch.from_numpy(np.repeat(np.arange(len(histories)), lengths))
    cols = torch.from_numpy(np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]))
    keep = scores.gather(1, targets.unsqueeze(1)).clone()
    scores[rows, cols] = float("-inf")
    scores.scatter_(1, targets.unsqueeze(1), keep)
    return scores


def evaluate(
    score_fn: ScoreFn,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    ks: Sequence[int] = KS,
    *,
    batch_size: int = 512,
    exclude_history: bool = True,
    progress: bool = False,
    desc: str = "eval",
    extras: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean HR@K / NDCG@K over users whose target is >= 0.

    ``score_fn(histories)`` scores a batch; with ``extras`` (one row per user,
    e.g. a query embedding) it is called as ``score_fn(histories, extras[batch])``.
    Users are scored in batches ordered by history length (so scorers can pad
    tightly); the result does not depend on the order.
    """
    users = np.flatnonzero(np.asarray(targets) >= 0)
    users = users[np.argsort([len(histories[u]) for u in users], kind="stable")]
    sums: dict[str, float] = {}
    starts = range(0, len(users), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = users[start : start + batch_size]
        hist = [np.asarray(histories[u], dtype=np.int64) for u in batch]
        tgt = torch.from_numpy(np.asarray(targets)[batch].astype(np.int64))
        raw = score_fn(hist) if extras is None else score_fn(hist, extras[batch])
        if isinstance(raw, np.ndarray):
            scores = torch.tensor(raw, dtype=torch.float32)  # a copy: masking writes into it
        else:
            scores = raw.to(torch.float32, copy=True)
        if exclude_history:
            mask_history(scores, hist, tgt)
        for name, values in rank_metrics(scores, tgt, ks).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
    n = max(len(users), 1)
    return {name: total / n for name, total in sums.items()} | {"users": float(len(users))}


def list_recall(candidates: np.ndarray, targets: np.ndarray) -> float:
    """Share of users (target >= 0) whose target is in their candidate row (``-1`` = empty)."""
    users = np.asarray(targets) >= 0
    hit = (np.asarray(candidates)[users] == np.asarray(targets)[users, None]).any(1)
    return float(hit.mean()) if hit.size else 0.0
