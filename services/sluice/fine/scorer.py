"""Fine ranking: the transformer scores each candidate against history and query.

The stage logic (:class:`FineStage`) maps item ids to the model's dense
indices and pads to the fixed tensor shapes Triton batches on; the model runs
behind :class:`RankerBackend`: :class:`TritonBackend` in production (gRPC to
Triton Inference Server) or :class:`TorchBackend` in process (tests,
evaluation, and the no-gRPC baseline of the benchmark).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from sluice.core.errors import DeadlineExceeded, Unavailable
from sluice.data.catalog import Catalog
from sluice.domain import Candidates, RankContext
from sluice.embed.text import TEXT_DIM
from sluice.fine.fusion import FusionWeights, fuse

log = logging.getLogger(__name__)

HISTORY_LEN = 50
CANDIDATES_PER_ROW = 256


class RankerBackend(Protocol):
    """Scores padded batches; shapes [B, HISTORY_LEN], [B, CANDIDATES_PER_ROW], [B, 384], [B, 1]."""

    version: str

    def score(
        self,
        history: np.ndarray,
        candidates: np.ndarray,
        query_emb: np.ndarray,
        has_query: np.ndarray,
        timeout_s: float | None = None,
    ) -> np.ndarray: ...


class TorchBackend:
    """The ranker in this process (no Triton, no gRPC)."""

    def __init__(self, directory: Path, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        from sluice.fine.model import FineRanker

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self._model = FineRanker.load(directory, map_location=self._device).eval()
        self.version = directory.name
        self._lock = threading.Lock()

    def score(
        self,
        history: np.ndarray,
        candidates: np.ndarray,
        query_emb: np.ndarray,
        has_query: np.ndarray,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            out = self._model.score(
                torch.from_numpy(history).to(self._device),
                torch.from_numpy(candidates).to(self._device),
                torch.from_numpy(query_emb).to(self._device),
                torch.from_numpy(has_query.reshape(-1)).to(self._device),
            )
        return out.float().cpu().numpy()


class TritonBackend:
    """The ranker on Triton Inference Server, over gRPC with tritonclient."""

    def __init__(self, url: str, model_name: str = "fine_ranker", model_version: str = "") -> None:
        import tritonclient.grpc as grpcclient

        self._client_mod = grpcclient
        self._client = grpcclient.InferenceServerClient(url=url)
        self.url = url
        self.model_name = model_name
        self.version = model_version

    def ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model_name, self.version))
        except Exception:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Block until Triton serves the model: Triton and its services start side by side."""
        deadline = time.monotonic() + timeout_s
        delay_s = 0.05
        logged = False
        while not self.ready():
            if not logged:
                log.info("waiting for triton", extra={"url": self.url, "model": self.model_name})
                logged = True
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"triton at {self.url} did not serve {self.model_name} "
                    f"version {self.version or 'latest'} within {timeout_s:.0f} s"
                )
            # Triton has no push notification for "model loaded": poll with back-off
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)

    def score(
        self,
        history: np.ndarray,
        candidates: np.ndarray,
        query_emb: np.ndarray,
        has_query: np.ndarray,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        g = self._client_mod
        inputs = [
            g.InferInput("HISTORY", list(history.shape), "INT64"),
            g.InferInput("CANDIDATES", list(candidates.shape), "INT64"),
            g.InferInput("QUERY_EMB", list(query_emb.shape), "FP32"),
            g.InferInput("HAS_QUERY", list(has_query.shape), "BOOL"),
        ]
        for tensor, value in zip(inputs, (history, candidates, query_emb, has_query), strict=True):
            tensor.set_data_from_numpy(value)
        try:
            result = self._client.infer(
                self.model_name,
                inputs,
                model_version=self.version,
                outputs=[g.InferRequestedOutput("SCORES")],
                client_timeout=timeout_s,
            )
        except InferenceServerException as err:
            status = str(err.status() or "")
            if "DEADLINE" in status.upper() or "Deadline" in str(err):
                raise DeadlineExceeded(f"triton did not answer in time: {err.message()}") from err
            raise Unavailable(f"triton inference failed: {err.message()}") from err
        scores = result.as_numpy("SCORES")
        if scores is None:
            raise Unavailable("triton returned no SCORES output")
        return np.asarray(scores, dtype=np.float32)


class FineStage:
    """Pure stage logic around a backend."""

    def __init__(
        self, catalog: Catalog, backend: RankerBackend, fusion: FusionWeights | None = None
    ) -> None:
        self.catalog = catalog
        self.backend = backend
        self.fusion = fusion or FusionWeights()

    def tensors(
        self, ctx: RankContext, cands: Candidates
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Padded model inputs; candidates are split over rows of CANDIDATES_PER_ROW."""
        hist = self.catalog.rows(ctx.history_item_ids)
        hist = hist[hist >= 0][-HISTORY_LEN:] + 1
        n_rows = max(1, -(-len(cands) // CANDIDATES_PER_ROW))
        history = np.zeros((n_rows, HISTORY_LEN), dtype=np.int64)
        if len(hist):
            history[:, HISTORY_LEN - len(hist) :] = hist
        dense = self.catalog.rows(cands.item_ids) + 1  # unknown ids become 0 (padding)
        cand = np.zeros(n_rows * CANDIDATES_PER_ROW, dtype=np.int64)
        cand[: len(dense)] = dense
        query = np.zeros((n_rows, TEXT_DIM), dtype=np.float32)
        has_query = np.zeros((n_rows, 1), dtype=bool)
        if ctx.query_embedding is not None:
            query[:] = ctx.query_embedding
            has_query[:] = True
        return history, cand.reshape(n_rows, CANDIDATES_PER_ROW), query, has_query

    def rank(
        self, ctx: RankContext, cands: Candidates, keep: int = 0, timeout_s: float | None = None
    ) -> Candidates:
        if len(cands) == 0:
            return cands
        if ctx.is_anonymous:  # the transformer would read nothing: keep the incoming order
            return cands.top(keep if keep > 0 else len(cands))
        fine = self.model_scores(ctx, cands, timeout_s)
        fused = fuse(fine, cands.scores, self.fusion.beta(ctx.is_search))
        known = self.catalog.rows(cands.item_ids) >= 0
        ranked = cands.with_scores(np.where(known, fused, np.float32(-1e9)))
        return ranked.top(keep if keep > 0 else len(cands))

    def model_scores(
        self, ctx: RankContext, cands: Candidates, timeout_s: float | None = None
    ) -> np.ndarray:
        """The transformer's raw score of each candidate, in input order."""
        history, cand, query, has_query = self.tensors(ctx, cands)
        scores = self.backend.score(history, cand, query, has_query, timeout_s=timeout_s)
        return scores.reshape(-1)[: len(cands)].astype(np.float32)
