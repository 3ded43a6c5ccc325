"""The ranker contract: the tensors any model the fine stage calls must declare.

The fine stage sends padded, fixed-shape batches and reads one score per candidate. Any
model in the Triton model repository that declares exactly these inputs and this output
(names, datatypes, shapes; a variable batch dimension first) can be served by the stage,
chosen by ``SLUICE_FINE_MODEL_NAME``: the build's transformer (``fine_ranker``, exported
to ONNX) or a model an ML engineer brings (docs/deploy.md).

    HISTORY     INT64 [batch, 50]   dense item indices, left-padded with 0, most recent last
    CANDIDATES  INT64 [batch, 256]  dense item indices to score, 0 = padding
    QUERY_EMB   FP32  [batch, 384]  the query's MiniLM embedding (zeros without a query)
    HAS_QUERY   BOOL  [batch, 1]    whether the row is a search
    SCORES      FP32  [batch, 256]  one score per candidate (padding's score is ignored)

A dense index is the item's catalog row + 1, as the build numbered them.

This module imports nothing heavy: the fine stage (no torch) and ``sluice.launch`` use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sluice.embed.text import TEXT_DIM

HISTORY_LEN = 50
CANDIDATES_PER_ROW = 256
# The model the build exports (sluice build): served by default.
BUILD_MODEL = "fine_ranker"
# The file the stock onnxruntime backend loads from a version directory, and the one the
# python-backend runner of configs/local.pbtxt loads too.
ONNX_FILE = "model.onnx"
# Configs under <model>/configs/, chosen with tritonserver --model-config-name.
GPU_CONFIG = "gpu"
LOCAL_CONFIG = "local"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the contract; ``dims`` without the batch dimension."""

    name: str
    datatype: str  # Triton's name (INT64, FP32, BOOL), as model metadata reports it
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(NUMPY_DTYPES[self.datatype])


NUMPY_DTYPES: Mapping[str, type] = {"INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}

INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("HISTORY", "INT64", (HISTORY_LEN,)),
    TensorSpec("CANDIDATES", "INT64", (CANDIDATES_PER_ROW,)),
    TensorSpec("QUERY_EMB", "FP32", (TEXT_DIM,)),
    TensorSpec("HAS_QUERY", "BOOL", (1,)),
)
OUTPUTS: tuple[TensorSpec, ...] = (TensorSpec("SCORES", "FP32", (CANDIDATES_PER_ROW,)),)


def describe() -> str:
    """The contract in one line, for error messages."""
    parts = [f"{t.name} {t.datatype} [-1, {', '.join(map(str, t.dims))}]" for t in INPUTS]
    outs = [f"{t.name} {t.datatype} [-1, {', '.join(map(str, t.dims))}]" for t in OUTPUTS]
    return f"inputs {'; '.join(parts)} -> outputs {'; '.join(outs)}"


def _check_tensors(
    kind: str, declared: Sequence[Mapping[str, Any]], wanted: Sequence[TensorSpec]
) -> list[str]:
    problems: list[str] = []
    by_name = {str(t.get("name")): t for t in declared}
    for spec in wanted:
        got = by_name.pop(spec.name, None)
        if got is None:
            problems.append(f"{kind} {spec.name} is missing")
            continue
        datatype = str(got.get("datatype", ""))
        if datatype != spec.datatype:
            problems.append(f"{kind} {spec.name} is {datatype or '?'}, not {spec.datatype}")
        shape = [int(d) for d in got.get("shape", [])]
        # the batch dimension is variable (-1); a model may leave other dimensions variable
        ok = (
            len(shape) == len(spec.dims) + 1
            and shape[0] == -1
            and all(d in (-1, want) for d, want in zip(shape[1:], spec.dims, strict=True))
        )
        if not ok:
            want = [-1, *spec.dims]
            problems.append(f"{kind} {spec.name} has shape {shape}, not {want}")
    if kind == "input":  # the stage sends exactly these; an extra required input would fail
        problems += [f"input {name} is not part of the contract" for name in sorted(by_name)]
    return problems


def check_metadata(metadata: Mapping[str, Any]) -> list[str]:
    """What keeps a model (Triton model metadata, as JSON) from serving the stage; empty: ok.

    ``metadata`` is ``InferenceServerClient.get_model_metadata(..., as_json=True)``: inputs
    and outputs with ``name``, ``datatype`` and ``shape`` (the batch dimension as -1 when
    the model batches). Extra outputs are allowed (the stage asks only for SCORES).
    """
    return _check_tensors("input", metadata.get("inputs", []), INPUTS) + _check_tensors(
        "output", metadata.get("outputs", []), OUTPUTS
    )


def has_backend(backend_dir: Path, name: str) -> bool:
    """Whether a Triton backend directory holds backend ``name`` (``<dir>/<name>/``)."""
    folder = backend_dir / name
    return folder.is_dir() and any(folder.glob("libtriton_*.so"))


def model_config_name(backend_dir: Path, gpu: bool) -> str | None:
    """The ``--model-config-name`` for a ``tritonserver`` with backends in ``backend_dir``.

    ``gpu``: configs/gpu.pbtxt (onnxruntime on the GPU; an error where that backend is
    missing). Otherwise the default config.pbtxt
    (the stock onnxruntime backend) where that backend is installed, and configs/local.pbtxt
    (the python backend running the same model.onnx with onnxruntime) where it is not, as
    in the ``tritonserver`` of the nvidia-pytriton wheel. A model without the named config
    falls back to its config.pbtxt (Triton's rule).
    """
    onnxruntime = has_backend(backend_dir, "onnxruntime")
    if gpu:
        if not onnxruntime:
            raise ValueError(
                f"the GPU config runs Triton's onnxruntime backend, which {backend_dir} lacks: "
                "serve the GPU ranker from an NGC tritonserver image (docs/deploy.md)"
            )
        return GPU_CONFIG
    return None if onnxruntime else LOCAL_CONFIG
