"""Build-time text encoding (``sluice build --encoder``): the int8 ONNX encoder, encoding each
distinct text once, and the cache files of the default and the int8 choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sluice.data.catalog import Catalog
from sluice.data.synthetic import ShopSpec, generate_shop
from sluice.embed.batch import (
    BUILD_ENCODERS,
    DEFAULT_ENCODER,
    INT8,
    build_encoder,
    distinct,
    encode_distinct,
    int8_model,
)
from sluice.embed.onnx import OnnxMiniLMEncoder
from sluice.embed.text import MiniLMEncoder
from sluice.eval.offline import _key, pseudo_query_table, text_table
from sluice.fine.train import pseudo_query_texts

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "var" / "cache"  # where the tests' builds cache MiniLM; the int8 export too


@pytest.fixture(scope="module")
def int8_path() -> Path:
    """The int8 export (made once, then reused from var/cache like the build's tables)."""
    return int8_model(CACHE)


@pytest.fixture(scope="module")
def int8(int8_path: Path) -> OnnxMiniLMEncoder:
    return OnnxMiniLMEncoder(int8_path, threads=1, max_length=BUILD_ENCODERS[INT8].max_length)


@pytest.fixture(scope="module")
def shop() -> Catalog:
    catalog, _ = generate_shop(ShopSpec(num_items=300, num_users=5, seed=11))
    return catalog


def test_distinct_keeps_first_seen_order_and_maps_every_text() -> None:
    texts = ["b", "a", "b", "", "a", "B"]
    unique, inverse = distinct(texts)
    assert unique == ["b", "a", "", "B"]
    assert [unique[i] for i in inverse] == texts


def test_each_distinct_text_once_gives_every_texts_own_vector(int8: OnnxMiniLMEncoder) -> None:
    """Batch size 1: a text's vector depends on the text alone, so the rows must be equal."""
    texts = ["red shoes", "blue hat", "red shoes", "", "Red Shoes", "blue hat", "red shoes"]
    every = int8.encode(texts, batch_size=1)
    once = encode_distinct(int8, texts, batch_size=1)
    np.testing.assert_array_equal(once, every)
    out = np.full((len(texts), int8.dim), np.nan, dtype=np.float32)
    assert encode_distinct(int8, texts, batch_size=1, out=out) is out
    np.testing.assert_array_equal(out, every)
    assert encode_distinct(int8, [], out=np.zeros((0, int8.dim), np.float32)).shape == (0, 384)


def test_int8_vectors_are_unit_length_and_close_to_the_default_build(
    int8: OnnxMiniLMEncoder, shop: Catalog
) -> None:
    """Cosine to sentence-transformers fp32 measured 0.992-0.993 on average, 0.976 at the
    worst on generated titles and pseudo-queries (``sluice.bench.build_encoder``)."""
    texts = [shop.text(r) for r in range(len(shop))][:100]
    texts += pseudo_query_texts(shop.titles[:50], 2, seed=0)
    ours = encode_distinct(int8, texts)
    reference = MiniLMEncoder(device="cpu").encode(texts)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.mean() > 0.985
    assert cosine.min() > 0.95


def test_max_length_truncates_like_a_shorter_text(int8_path: Path) -> None:
    """With 8 tokens, ``[CLS]`` + six one-token words + ``[SEP]`` are all that is left."""
    short = OnnxMiniLMEncoder(int8_path, threads=1, max_length=8)
    full = OnnxMiniLMEncoder(int8_path, threads=1)
    assert (short.max_length, full.max_length) == (8, 256)
    words = ["red", "blue", "green", "black", "white", "pink", "brown", "gray"]
    truncated = short.encode([" ".join(words)])
    np.testing.assert_array_equal(truncated, full.encode([" ".join(words[:6])]))
    assert float((truncated * full.encode([" ".join(words)])).sum()) < 0.999
    with pytest.raises(ValueError, match="max_length"):
        OnnxMiniLMEncoder(int8_path, max_length=1)


def test_the_default_reads_the_cache_files_it_always_did(tmp_path: Path, shop: Catalog) -> None:
    """Files made before the choice existed stay valid; int8 tables never shadow them."""
    key = _key(shop)
    legacy_titles = np.random.default_rng(0).random((len(shop) + 1, 384), dtype=np.float32)
    legacy_pseudo = np.random.default_rng(1).random((len(shop) + 1, 2, 384), dtype=np.float32)
    np.save(tmp_path / f"titles-{key}.npy", legacy_titles)
    np.save(tmp_path / f"pseudo-queries-{key}-2-5.npy", legacy_pseudo)
    np.testing.assert_array_equal(text_table(shop, tmp_path, False), legacy_titles)
    np.testing.assert_array_equal(
        text_table(shop, tmp_path, False, encoder=DEFAULT_ENCODER), legacy_titles
    )
    np.testing.assert_array_equal(pseudo_query_table(shop, 2, 5, tmp_path, False), legacy_pseudo)
    tag = build_encoder(INT8).cache_tag
    assert tag and not build_encoder(DEFAULT_ENCODER).cache_tag
    assert not (tmp_path / f"titles-{key}{tag}.npy").exists()


def test_int8_tables_are_built_from_distinct_texts_and_cached(
    tmp_path: Path, int8_path: Path, int8: OnnxMiniLMEncoder
) -> None:
    catalog, _ = generate_shop(ShopSpec(num_items=60, num_users=5, seed=5))
    (tmp_path / int8_path.parent.name).symlink_to(int8_path.parent)  # no second export
    table = text_table(catalog, tmp_path, False, encoder=INT8)
    assert table.shape == (61, 384) and not table[0].any()
    expected = encode_distinct(int8, [catalog.text(r) for r in range(len(catalog))])
    np.testing.assert_allclose(table[1:], expected, atol=1e-5)
    pseudo = pseudo_query_table(catalog, 2, 3, tmp_path, False, encoder=INT8)
    assert pseudo.shape == (61, 2, 384) and not pseudo[0].any()
    texts = pseudo_query_texts(catalog.titles, 2, 3)
    np.testing.assert_allclose(
        pseudo[1:].reshape(len(texts), -1), encode_distinct(int8, texts), atol=1e-5
    )
    tag = build_encoder(INT8).cache_tag
    cached = tmp_path / f"titles-{_key(catalog)}{tag}.npy"
    assert cached.exists() and (tmp_path / f"pseudo-queries-{_key(catalog)}-2-3{tag}.npy").exists()
    np.save(cached, np.ones_like(table))  # the next call reads the file, encodes nothing
    assert text_table(catalog, tmp_path, False, encoder=INT8).all()


def test_an_unknown_encoder_names_the_choices(tmp_path: Path, shop: Catalog) -> None:
    with pytest.raises(ValueError, match="minilm, minilm-int8"):
        text_table(shop, tmp_path, False, encoder="minilm-fp16")
    with pytest.raises(ValueError, match="unknown text encoder"):
        pseudo_query_table(shop, 2, 0, tmp_path, False, encoder="")
