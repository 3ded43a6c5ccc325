"""Where the fine ranker's model runs: the engine's only I/O goes through a backend.

:class:`TritonBackend` calls Triton Inference Server over gRPC (production);
:class:`TorchBackend` runs the model in this process (tests, evaluation, and the no-gRPC
baseline of the benchmark). Both take the fixed, padded shapes that Triton batches on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sluice.core import tracing
from sluice.core.errors import DeadlineExceeded, Unavailable
from sluice.fine import contract
from sluice.fine.contract import CANDIDATES_PER_ROW, HISTORY_LEN

log = logging.getLogger(__name__)

__all__ = [
    "CANDIDATES_PER_ROW",
    "HISTORY_LEN",
    "RankerBackend",
    "RankerContractError",
    "TorchBackend",
    "TritonBackend",
    "model_id",
]
# the CLIENT span of a Triton inference, named as the gRPC instrumentation names calls
TRITON_SPAN = "/inference.GRPCInferenceService/ModelInfer"


class RankerBackend(Protocol):
    """Scores padded batches; shapes [B, HISTORY_LEN], [B, CANDIDATES_PER_ROW], [B, 384], [B, 1]."""

    model_name: str
    version: str

    def score(
        self,
        history: np.ndarray,
        candidates: np.ndarray,
        query_emb: np.ndarray,
        has_query: np.ndarray,
        timeout_s: float | None = None,
    ) -> np.ndarray: ...


def model_id(backend: RankerBackend) -> str:
    """``name:version`` of the model a backend scores with (what fusion weights name)."""
    return f"{backend.model_name}:{backend.version}"


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
        self.model_name = contract.BUILD_MODEL  # a build's ranker folder holds its own model
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


class OnnxBackend:
    """The build's ``model.onnx`` on ONNX Runtime in this process: the file Triton serves,
    without Triton (no gRPC hop, no dynamic batching across requests). ``threads``: ONNX
    Runtime's intra-op threads (the python backend's ``configs/local.pbtxt`` uses 1)."""

    def __init__(self, directory: Path, threads: int = 1) -> None:
        from sluice.embed.onnx import cpu_session

        path = directory / contract.ONNX_FILE
        if not path.exists():
            raise Unavailable(
                f"{directory} has no {contract.ONNX_FILE}: rebuild, or export it with "
                f"python -m sluice.fine.onnx_export {directory}"
            )
        self._session = cpu_session(path, threads)
        self.model_name = contract.BUILD_MODEL  # a build's ranker folder holds its own model
        self.version = directory.name
        problems = contract.check_metadata(self.metadata())
        if problems:
            raise RankerContractError(
                f"{path} does not declare the ranker contract: {'; '.join(problems)} "
                f"(wanted: {contract.describe()})"
            )

    def metadata(self) -> dict[str, list[dict[str, object]]]:
        """The model's tensors as Triton's model metadata names them (for the contract)."""
        names = {"tensor(int64)": "INT64", "tensor(float)": "FP32", "tensor(bool)": "BOOL"}

        def tensors(args: list[Any]) -> list[dict[str, object]]:
            return [
                {
                    "name": t.name,
                    "datatype": names.get(t.type, t.type),
                    "shape": [d if isinstance(d, int) else -1 for d in t.shape],
                }
                for t in args
            ]

        return {
            "inputs": tensors(self._session.get_inputs()),
            "outputs": tensors(self._session.get_outputs()),
        }

    def score(
        self,
        history: np.ndarray,
        candidates: np.ndarray,
        query_emb: np.ndarray,
        has_query: np.ndarray,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        feed = {
            "HISTORY": history,
            "CANDIDATES": candidates,
            "QUERY_EMB": query_emb,
            "HAS_QUERY": has_query.reshape(-1, 1),
        }
        (scores,) = self._session.run(["SCORES"], feed)  # thread-safe: no lock
        return np.asarray(scores, dtype=np.float32)


@dataclass
class RankerContractError(Unavailable):
    """The configured Triton model does not declare the ranker contract: the stage stays down."""

    reason: str = "RANKER_CONTRACT"


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
        host, _, port = url.rpartition(":")
        self._span_attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": "inference.GRPCInferenceService",
            "rpc.method": "ModelInfer",
            "server.address": host or url,
            "server.port": int(port) if port.isdigit() else 0,
            "sluice.triton.model": model_name,
            "sluice.triton.model_version": model_version or "latest",
        }

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
        self.check_contract()

    def check_contract(self) -> None:
        """Refuse a model that does not declare the ranker contract (sluice.fine.contract).

        Reads the model's metadata from Triton (names, datatypes, shapes). Without a version
        configured, pins the newest one Triton serves, so every answer names its version.
        """
        try:
            meta = self._client.get_model_metadata(self.model_name, self.version, as_json=True)
        except Exception as err:
            raise Unavailable(f"triton gave no metadata for {self.model_name}: {err}") from err
        problems = contract.check_metadata(meta)
        if problems:
            log.error(
                "the model does not declare the ranker contract; not serving",
                extra={
                    "model": self.model_name,
                    "version": self.version or "latest",
                    "problems": problems,
                    "contract": contract.describe(),
                },
            )
            raise RankerContractError(
                f"model {self.model_name} on triton at {self.url} does not declare the ranker "
                f"contract: {'; '.join(problems)} (wanted: {contract.describe()})"
            )
        if not self.version:
            versions = [str(v) for v in meta.get("versions", [])]
            newest = max(versions, key=lambda v: (len(v), v), default="")
            if newest:
                self.version = newest
                self._span_attributes["sluice.triton.model_version"] = newest
        log.info(
            "ranker contract checked", extra={"model": self.model_name, "version": self.version}
        )

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
        attributes = {**self._span_attributes, "sluice.triton.rows": int(history.shape[0])}
        # the span's W3C trace context goes to Triton in the request's headers
        with tracing.client_span(TRITON_SPAN, attributes) as headers:
            try:
                result = self._client.infer(
                    self.model_name,
                    inputs,
                    model_version=self.version,
                    outputs=[g.InferRequestedOutput("SCORES")],
                    client_timeout=timeout_s,
                    headers=headers or None,
                )
            except InferenceServerException as err:
                status = str(err.status() or "")
                if "DEADLINE" in status.upper() or "Deadline" in str(err):
                    raise DeadlineExceeded(
                        f"triton did not answer in time: {err.message()}"
                    ) from err
                raise Unavailable(f"triton inference failed: {err.message()}") from err
        scores = result.as_numpy("SCORES")
        if scores is None:
            raise Unavailable("triton returned no SCORES output")
        return np.asarray(scores, dtype=np.float32)
