"""IVF shards against one IVF index: the overlap of their top 1,000 (sluice.recall.shards).

Flat shards are exact (tests/stages/test_shards.py). An IVF index probes a share of its
lists, so shards of IVF indexes find other near neighbours than one IVF index over every
vector; the front gathers the shards' lists by score. Here on clustered vectors as the
ranker's item vectors are, each shard built as ``sluice shard`` builds it.
"""

from __future__ import annotations

import numpy as np

from sluice.recall.ann_index import AnnIndex, build_index
from sluice.recall.shards import ShardManifest


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _gathered(parts: list[AnnIndex], starts: list[int], q: np.ndarray, k: int) -> np.ndarray:
    scores, rows = [], []
    for index, start in zip(parts, starts, strict=True):
        s, r = index.search(q, k)
        keep = r >= 0
        scores.append(np.where(keep, s, -np.inf))
        rows.append(np.where(keep, r + start, -1))
    s, r = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(r, best, axis=1)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b, strict=True)]))


def test_ivf_shards_keep_95_percent_of_one_ivf_index_top_1000() -> None:
    n, d, k = 60_000, 64, 1000
    x = _clustered(n, d, 300, seed=1)
    queries = _clustered(40, d, 300, seed=2)
    exact = AnnIndex(build_index(x, "flat")).search(queries, k)[1]
    whole = AnnIndex(build_index(x, "ivf_flat")).search(queries, k)[1]
    manifest = ShardManifest.even(n, 4, "ivf_flat")
    parts = [AnnIndex(build_index(x[a:b], "ivf_flat")) for a, b in manifest.ranges]
    sharded = _gathered(parts, [a for a, _ in manifest.ranges], queries, k)
    versus_one = _overlap(whole, sharded)
    versus_exact = _overlap(exact, sharded)
    print(
        f"\ntop-{k} overlap of 4 IVF shards: {versus_one:.4f} with one IVF index, "
        f"{versus_exact:.4f} with exact search (one IVF index: {_overlap(exact, whole):.4f})"
    )
    assert versus_one >= 0.95
    assert versus_exact >= 0.95
