"""What Triton's python backend runs for ``fine_ranker``.

``model_repository/fine_ranker/<version>/model.py`` only imports
:class:`TritonRanker` and converts tensors; all logic is here or in
:mod:`sluice.fine.model`, testable without Triton.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TritonRanker:
    """Scores a dynamic batch: requests are concatenated, scored once, split."""

    def __init__(self, directory: Path, device: str = "cpu") -> None:
        import torch

        from sluice.fine.model import FineRanker

        self._torch = torch
        self.device = torch.device(device)
        self.model = FineRanker.load(directory, map_location=self.device).eval()

    def score_batch(
        self,
        history: list[np.ndarray],
        candidates: list[np.ndarray],
        query_emb: list[np.ndarray],
        has_query: list[np.ndarray],
    ) -> list[np.ndarray]:
        torch = self._torch
        sizes = [len(h) for h in history]
        dev = self.device
        with torch.inference_mode():
            out = self.model.score(
                torch.from_numpy(np.concatenate(history)).to(dev),
                torch.from_numpy(np.concatenate(candidates)).to(dev),
                torch.from_numpy(np.concatenate(query_emb)).to(dev),
                torch.from_numpy(np.concatenate(has_query).reshape(-1)).to(dev),
            )
        scores = out.float().cpu().numpy()
        return np.split(scores, np.cumsum(sizes)[:-1])
