"""The versioned output of ``sluice build`` and how services load it.

An artifact directory holds::

    manifest.json         version, dataset, sizes, the fine ranker's model version
    catalog.npz, catalog_text.json
    text_vectors.npy      MiniLM item text embeddings [n, 384]
    text_encoder.onnx     MiniLM exported for ONNX Runtime: the gateway's query encoder
    behaviour_vectors.npy learned item vectors of the fine ranker [n, d]
    text.faiss, behaviour.faiss
    lexical/              BM25 index
    cooc.npz              item co-occurrence: sparse matrix and top-k table
    popularity.npy        training-interaction counts per row
    coarse.json           coarse ranker weights
    users.npz             users' training histories (seed of the embedded state store)

The fine ranker itself lives in the Triton model repository named in the
manifest, under ``fine_ranker/<version>/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from sluice.data.catalog import Catalog

MANIFEST = "manifest.json"


@dataclass
class Artifacts:
    """Lazy view of an artifact directory.

    With ``room > 0`` (a service that takes live catalog updates, :mod:`sluice.data.updates`)
    the catalog and every per-row table have ``room`` more rows, empty and hidden, for items
    added after the build: zero vectors, no popularity, no co-occurrence."""

    root: Path
    room: int = 0

    def _pad(self, table: np.ndarray, fill: float = 0) -> np.ndarray:
        if not self.room:
            return table
        extra = np.full((self.room, *table.shape[1:]), fill, dtype=table.dtype)
        return np.concatenate([table, extra])

    @cached_property
    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"no {MANIFEST} in {self.root}: run `sluice build` first")
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    @property
    def model_repository(self) -> Path:
        return Path(self.manifest["fine_ranker"]["repository"])

    @property
    def ranker_version(self) -> str:
        return str(self.manifest["fine_ranker"]["version"])

    @property
    def ranker_dir(self) -> Path:
        return self.model_repository / "fine_ranker" / self.ranker_version

    @cached_property
    def catalog(self) -> Catalog:
        catalog = Catalog.load(self.root)
        return catalog.with_room(self.room) if self.room else catalog

    @cached_property
    def text_vectors(self) -> np.ndarray:
        return self._pad(np.load(self.root / "text_vectors.npy"))

    @cached_property
    def behaviour_vectors(self) -> np.ndarray:
        return self._pad(np.load(self.root / "behaviour_vectors.npy"))

    @cached_property
    def popularity(self) -> np.ndarray:
        return self._pad(np.load(self.root / "popularity.npy"))

    @cached_property
    def cooc(self) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        data = np.load(self.root / "cooc.npz")
        matrix = sparse.csr_matrix(
            (data["data"], data["indices"], data["indptr"]), shape=tuple(data["shape"])
        )
        if self.room:
            n = matrix.shape[0] + self.room
            matrix.resize((n, n))
        return matrix, self._pad(data["top_rows"], -1), self._pad(data["top_scores"])

    def users(self) -> tuple[list[str], list[np.ndarray]]:
        """User ids and their training histories as item ids, oldest first."""
        data = np.load(self.root / "users.npz")
        ids = json.loads(str(data["user_ids"]))
        offsets, items = data["offsets"], data["item_ids"]
        return ids, [items[offsets[i] : offsets[i + 1]] for i in range(len(ids))]


def save_cooc(
    path: Path, matrix: sparse.csr_matrix, top_rows: np.ndarray, top_scores: np.ndarray
) -> None:
    m = sparse.csr_matrix(matrix, dtype=np.float32)
    np.savez(
        path,
        data=m.data,
        indices=m.indices,
        indptr=m.indptr,
        shape=np.asarray(m.shape),
        top_rows=top_rows,
        top_scores=top_scores,
    )


def save_users(path: Path, user_ids: list[str], histories: list[np.ndarray]) -> None:
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(h) for h in histories])
    items = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    np.savez(path, user_ids=np.asarray(json.dumps(user_ids)), offsets=offsets, item_ids=items)
