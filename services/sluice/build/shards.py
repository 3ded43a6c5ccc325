"""Cut a build's recall assets into shards: contiguous row ranges (:mod:`sluice.recall.shards`).

``sluice build --shards N`` runs this as its last recall step; ``sluice shard ARTIFACTS N``
runs it on a build that exists (it changes nothing else in the build).
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np

from sluice.artifacts import Artifacts
from sluice.recall.ann_index import AnnIndex, build_index
from sluice.recall.lexical import LexicalIndex
from sluice.recall.shards import ShardManifest

log = logging.getLogger(__name__)


def in_range_neighbours(
    top_rows: np.ndarray, top_scores: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each seed's co-occurring rows that fall in ``start:stop``, as rows of the range, in
    their order (-1 padded, int32); the table is as wide as the most any seed has there."""
    inside = (top_rows >= start) & (top_rows < stop)
    width = max(1, int(inside.sum(axis=1).max(initial=0)))
    # a stable sort of "outside" moves each row's in-range entries to its front, in order
    order = np.argsort(~inside, axis=1, kind="stable")[:, :width]
    keep = np.take_along_axis(inside, order, axis=1)
    rows = np.where(keep, np.take_along_axis(top_rows, order, axis=1) - start, -1)
    scores = np.where(keep, np.take_along_axis(top_scores, order, axis=1), 0.0)
    return rows.astype(np.int32), scores.astype(np.float32)


def write_shards(artifacts: Artifacts, count: int, index_kind: str = "auto") -> ShardManifest:
    """Write ``count`` shards of ``artifacts`` (replacing any) and return their manifest.

    ``index_kind`` is each shard's ANN structure (:mod:`sluice.recall.ann_index`; ``auto``
    picks by the shard's size). ``flat`` shards answer exactly what the whole build does."""
    root = artifacts.root
    catalog = artifacts.catalog
    manifest = ShardManifest.even(len(catalog), count, index_kind)
    folder = ShardManifest.folder(root)
    if folder.exists():
        shutil.rmtree(folder)
    behaviour = artifacts.behaviour_vectors
    text = artifacts.text_vectors
    lexical = LexicalIndex.load(root / "lexical")
    _, top_rows, top_scores = artifacts.cooc
    for index, (start, stop) in enumerate(manifest.ranges):
        t0 = time.perf_counter()
        out = manifest.shard_dir(root, index)
        out.mkdir(parents=True)
        catalog.take(np.arange(start, stop)).save(out)
        for name, vectors in (("behaviour", behaviour), ("text", text)):
            part = np.ascontiguousarray(vectors[start:stop], dtype=np.float32)
            AnnIndex(build_index(part, index_kind)).save(out / f"{name}.faiss")
        lexical.slice_rows(start, stop).save(out / "lexical")
        rows, scores = in_range_neighbours(top_rows, top_scores, start, stop)
        np.savez(out / "cooc.npz", top_rows=rows, top_scores=scores)
        log.info(
            "wrote recall shard",
            extra={"shard": index, "rows": f"{start}:{stop}", "s": time.perf_counter() - t0},
        )
    manifest.save(root)
    return manifest
