"""Score fusion: the fine ranker's score with the cheap signals it does not read.

The coarse scorer sees features the transformer does not (exact BM25 match,
co-occurrence counts, popularity), so the final fine score is
``z(fine) + beta * z(coarse)`` with z-scores taken over the request's
candidates. ``beta`` is fitted per task at build time on held-out requests by
a grid search on HR@10; ``beta = 0`` means the transformer alone.

Recommendation can instead fuse several signals, each z-scored over the request's
candidates: the model's score, the coarse score and coarse features read again for the
candidates (co-occurrence with the history, its text similarity, popularity...), with
weights ``signals`` fitted by a listwise softmax over held-out requests
(:func:`fit_signals`). One coarse score is a compromise fitted to keep targets among
1,000 candidates; the fused weights are fitted for the top of the page, next to the
transformer's score. On Amazon Beauty this is most of the quality above the plain beta
(docs/quality.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
# A beta this large means the coarse score decides: the transformer's score could only break
# ties (coarse z-scores within about 1e-6 of each other, equal at float32). A build without
# behaviour writes it (nothing taught the model), and the fine stage then keeps the coarse
# order without running the model. An arm's beta stays far below it
# (sluice.domain.MAX_FUSION_BETA).
COARSE_DECIDES_BETA = 1e6


def zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


# What the signal fusion may weigh: the model's score, the incoming (coarse) score, and
# these coarse features (sluice.coarse.engine.FEATURES), read again for the candidates
SIGNAL_FEATURES = (
    "log_cooc",
    "cooc",
    "history_text_sim",
    "behaviour_sim",
    "log_popularity",
    "recall_score",
)
SIGNALS = ("fine", "coarse", *SIGNAL_FEATURES)
NEEDED_FEATURES = frozenset(SIGNAL_FEATURES)
"""What the fine stage computes of the coarse features (``FeatureTables.features``)."""


@dataclass
class FusionWeights:
    recommend: float = 0.0
    search: float = 0.0
    # recommendation by several signals (weights by name, see SIGNALS); empty: by ``recommend``
    signals: dict[str, float] = field(default_factory=dict)
    # the ranker ("name:version") whose score the signal weights were fitted beside: another
    # model's score (a brought model, an arm's) is fused by ``recommend``
    signals_model: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.signals) - set(SIGNALS))
        if unknown:
            raise ValueError(f"fusion signals {unknown} are unknown (known: {list(SIGNALS)})")

    def beta(self, is_search: bool) -> float:
        return self.search if is_search else self.recommend

    def save(self, path: Path) -> None:
        data: dict[str, object] = {"recommend": self.recommend, "search": self.search}
        if self.signals:
            data["recommend_signals"] = self.signals
            data["recommend_signals_model"] = self.signals_model
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> FusionWeights:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        signals = {str(k): float(v) for k, v in data.get("recommend_signals", {}).items()}
        model = str(data.get("recommend_signals_model", ""))
        return cls(float(data["recommend"]), float(data["search"]), signals, model)


def fuse(fine: np.ndarray, coarse: np.ndarray, beta: float) -> np.ndarray:
    if beta == 0.0:
        return fine.astype(np.float32)
    return (zscore(fine) + beta * zscore(coarse)).astype(np.float32)


def signal_matrix(fine: np.ndarray, coarse: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``[candidates, len(SIGNALS)]``: every signal z-scored over the request's candidates.
    ``features`` is the coarse feature matrix of the candidates (``FeatureTables.features``)."""
    from sluice.coarse.engine import COLUMN

    columns = [fine, coarse] + [features[:, COLUMN[name]] for name in SIGNAL_FEATURES]
    return np.stack([zscore(c) for c in columns], axis=1)


def fuse_signals(signals: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    """The fused score of each candidate from its :func:`signal_matrix` row."""
    w = np.array([weights.get(name, 0.0) for name in SIGNALS])
    return (signals @ w).astype(np.float32)


def fit_signals(samples: Sequence[tuple[np.ndarray, int]], l2: float = 1e-3) -> dict[str, float]:
    """Signal weights maximising the mean log-softmax of the target among each request's
    candidates (``(signal_matrix, target position)`` per request), with an L2 penalty."""
    from scipy.optimize import minimize

    if not samples:
        return {}
    width = max(len(m) for m, _ in samples)
    z = np.zeros((len(samples), width, len(SIGNALS)))
    valid = np.zeros((len(samples), width), dtype=bool)
    for i, (m, _) in enumerate(samples):
        z[i, : len(m)] = m
        valid[i, : len(m)] = True
    target = np.array([t for _, t in samples])
    rows = np.arange(len(samples))

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = np.where(valid, z @ w, -np.inf)
        top = s.max(axis=1, keepdims=True)
        p = np.exp(s - top)
        total = p.sum(axis=1, keepdims=True)
        p /= total
        nll = (np.log(total[:, 0]) + top[:, 0] - s[rows, target]).mean() + l2 * float(w @ w)
        grad = (np.einsum("nc,ncf->nf", p, z) - z[rows, target]).mean(axis=0) + 2 * l2 * w
        return float(nll), grad

    start = np.zeros(len(SIGNALS))
    start[0] = 1.0  # the model's score alone
    found = minimize(loss, start, jac=True, method="L-BFGS-B")
    return {name: round(float(v), 6) for name, v in zip(SIGNALS, found.x, strict=True)}


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
