"""Where the fine ranker's model runs: the engine's only I/O goes through a backend.

:class:`TritonBackend` calls Triton Inference Server over gRPC (production);
:class:`TorchBackend` runs the model in this process (tests, evaluation, and the no-gRPC
baseline of the benchmark). Both take the fixed, padded shapes that Triton batches on.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from sluice.core.errors import DeadlineExceeded, Unavailable

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

    def __init__(
        self,
        url: str,
        model_name: str = "fine_ranker",
        model_version: str = "",
        tls: tuple[Path, Path | None, Path | None] | None = None,
    ) -> None:
        """``tls``: (CA, client certificate, client key) files for Triton's gRPC over TLS."""
        import tritonclient.grpc as grpcclient

        self._client_mod = grpcclient
        if tls is None:
            self._client = grpcclient.InferenceServerClient(url=url)
        else:
            ca, cert, key = tls
            self._client = grpcclient.InferenceServerClient(
                url=url,
                ssl=True,
                root_certificates=str(ca),
                certificate_chain=str(cert) if cert else None,
                private_key=str(key) if key else None,
            )
        self.url = url
        self.model_name = model_name
        self.version = model_version

    def close(self) -> None:
        self._client.close()

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
