"""Score fusion: the fine ranker's score plus a fitted share of the coarse score.

The coarse scorer sees features the transformer does not (exact BM25 match,
co-occurrence counts, popularity), so the final fine score is
``z(fine) + beta * z(coarse)`` with z-scores taken over the request's
candidates. ``beta`` is fitted per task at build time on held-out requests by
a grid search on HR@10; ``beta = 0`` means the transformer alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


def zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


@dataclass
class FusionWeights:
    recommend: float = 0.0
    search: float = 0.0

    def beta(self, is_search: bool) -> float:
        return self.search if is_search else self.recommend

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"recommend": self.recommend, "search": self.search}))

    @classmethod
    def load(cls, path: Path) -> FusionWeights:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(float(data["recommend"]), float(data["search"]))


def fuse(fine: np.ndarray, coarse: np.ndarray, beta: float) -> np.ndarray:
    if beta == 0.0:
        return fine.astype(np.float32)
    return (zscore(fine) + beta * zscore(coarse)).astype(np.float32)


def fit_beta(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    metric: Callable[[np.ndarray], float] | None = None,
) -> float:
    """Best beta on (fine scores, coarse scores, is-target mask) per request."""
    if not samples:
        return 0.0

    def hit10(ranks: np.ndarray) -> float:
        return float(np.mean(ranks < 10))

    score = metric or hit10
    best, best_value = 0.0, -1.0
    for beta in GRID:
        ranks = []
        for fine, coarse, target in samples:
            fused = fuse(fine, coarse, beta)
            t = fused[target]
            ranks.append(int((fused > t.max()).sum()) if len(t) else 10**9)
        value = score(np.asarray(ranks))
        if value > best_value + 1e-9:
            best, best_value = beta, value
    return best
