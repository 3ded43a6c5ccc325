"""The gateway's ONNX query encoder gives sentence-transformers' vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.embed.onnx import (
    INT8_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    OnnxMiniLMEncoder,
    query_encoder,
)
from sluice.embed.text import MiniLMEncoder


def test_build_exports_an_encoder_that_matches_sentence_transformers(
    tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    onnx = query_encoder(tiny_artifacts.root)
    assert isinstance(onnx, OnnxMiniLMEncoder)
    texts = [
        "trail running shoes",
        "Red LIPSTICK, matte",
        "",
        "x",
        # longer than the model's 256-token limit: both truncate the same way
        " ".join(["moisturizer"] * 400),
        *tiny_artifacts.catalog.titles[:50],
    ]
    a = onnx.encode(texts, batch_size=8)  # several batches, sorted by length inside
    b = encoder.encode(texts)
    assert a.shape == b.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.9999
    # rows come back in input order, not in the length-sorted order they were run in
    single = np.stack([onnx.encode([t])[0] for t in texts[:6]])
    np.testing.assert_allclose(single, a[:6], atol=1e-5)
    assert onnx.encode([]).shape == (0, 384)


def test_artifacts_without_the_export_fall_back(tmp_path, tiny_artifacts: Artifacts) -> None:
    assert (tiny_artifacts.root / ONNX_FILE).exists()
    assert isinstance(query_encoder(tmp_path), MiniLMEncoder)


def test_the_build_ships_the_tokenizer_the_model_package_gives(
    tmp_path: Path, tiny_artifacts: Artifacts
) -> None:
    """Serving reads the tokenizer from the build; a build without one uses the package's."""
    assert (tiny_artifacts.root / TOKENIZER_FILE).exists()
    older = tmp_path / "older"
    older.mkdir()
    (older / ONNX_FILE).symlink_to(tiny_artifacts.root / ONNX_FILE)
    texts = ["a " * 400 + "very long query", "espresso", ""]  # the first is truncated
    np.testing.assert_allclose(
        OnnxMiniLMEncoder(tiny_artifacts.root / ONNX_FILE).encode(texts),
        OnnxMiniLMEncoder(older / ONNX_FILE).encode(texts),
        atol=1e-6,
    )


def test_loading_the_encoders_leaves_the_environment_alone(tiny_artifacts: Artifacts) -> None:
    """A library must not change the process's environment (HF_HUB_OFFLINE and the like)."""
    import os

    before = dict(os.environ)
    query_encoder(tiny_artifacts.root).encode(["a query"])
    MiniLMEncoder().encode(["a title"])
    assert dict(os.environ) == before


def test_the_int8_query_encoder_is_the_builds_quantized_export(
    tmp_path: Path, tiny_artifacts: Artifacts
) -> None:
    """SLUICE_GATEWAY_QUERY_ENCODER=int8: the build's quantized file, close to fp32; a build
    without it falls back to fp32; an unknown precision is refused."""
    int8 = query_encoder(tiny_artifacts.root, precision="int8")
    fp32 = query_encoder(tiny_artifacts.root)
    assert isinstance(int8, OnnxMiniLMEncoder) and int8.path.name == INT8_FILE
    titles = tiny_artifacts.catalog.titles[:40]
    a, b = int8.encode(titles), fp32.encode(titles)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.98 and not np.array_equal(a, b)
    for name in (ONNX_FILE, TOKENIZER_FILE):
        (tmp_path / name).symlink_to(tiny_artifacts.root / name)
    fallback = query_encoder(tmp_path, precision="int8")
    assert isinstance(fallback, OnnxMiniLMEncoder) and fallback.path.name == ONNX_FILE
    with pytest.raises(ValueError, match="precision"):
        query_encoder(tiny_artifacts.root, precision="fp16")
