"""The search features beyond BM25 (title term pairs, description length), the model that reads
them, and the out-of-fold assignment of ``sluice eval search`` (no data, no builds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from sluice.coarse.engine import (
    FEATURES,
    SEARCH_FEATURES,
    CoarseEngine,
    FeatureTables,
    LinearWeights,
    weight_vector,
)
from sluice.coarse.fields import TextFields
from sluice.data.catalog import Catalog
from sluice.data.products import LabelledQueries
from sluice.domain import Budget, Candidates, RankContext, RequestKind
from sluice.eval import search
from sluice.eval.search import (
    QuerySample,
    fold_artifacts,
    oof_folds,
    out_of_fold_weights,
    subset,
)
from sluice.recall.lexical import LexicalIndex

TITLES = [
    "SanDisk 16GB Memory Card",  # "memory card" adjacent
    "Card holder with memory foam",  # both words, not adjacent
    "Acoustic guitar clamp",
    "Memory cards, pack of two",  # stems: memori card
]
DESCRIPTIONS = ["fast card for cameras", "", "a clamp " * 10, "two cards"]


def tiny_tables() -> FeatureTables:
    n = len(TITLES)
    catalog = Catalog.from_columns(list(range(1, n + 1)), TITLES, descriptions=DESCRIPTIONS)
    vectors = np.eye(n, 8, dtype=np.float32)
    return FeatureTables(
        catalog=catalog,
        behaviour_vectors=vectors,
        text_vectors=vectors,
        lexical=LexicalIndex.build(TITLES, DESCRIPTIONS),
        cooc=sparse.csr_matrix((n, n), dtype=np.float32),
        popularity=np.zeros(n, np.float32),
    )


def test_title_bigram_is_the_share_of_query_pairs_adjacent_in_the_title() -> None:
    fields = TextFields(TITLES, DESCRIPTIONS)
    rows = np.arange(len(TITLES))
    assert fields.title_bigram("memory card", rows).tolist() == [1.0, 0.0, 0.0, 1.0]
    # two distinct pairs (16gb memori, memori card): the first title has both, the last one
    assert fields.title_bigram("16GB memory card", rows).tolist() == [1.0, 0.0, 0.0, 0.5]
    assert fields.title_bigram("memory", rows).tolist() == [0.0] * 4  # one term: no pair
    # a pair with a term no title has counts, but matches nothing
    assert fields.title_bigram("memory card zzz", rows).tolist() == [0.5, 0.0, 0.0, 0.5]
    assert fields.title_bigram("", rows).tolist() == [0.0] * 4


def test_description_length_is_log_tokens() -> None:
    fields = TextFields(TITLES, DESCRIPTIONS)
    got = fields.description_length(np.array([0, 1, 2, 3]))
    assert got == pytest.approx([math.log1p(4), 0.0, math.log1p(20), math.log1p(2)])


def test_live_rows_are_indexed_and_replace_build_rows() -> None:
    fields = TextFields([*TITLES, ""], [*DESCRIPTIONS, ""])  # one row of room
    rows = np.array([4, 2])
    assert fields.title_bigram("guitar clamp", rows).tolist() == [0.0, 1.0]
    fields.add([4], ["Classical guitar clamp, black"], ["one two three"])
    assert fields.title_bigram("guitar clamp", rows).tolist() == [1.0, 1.0]
    assert fields.description_length(rows) == pytest.approx([math.log1p(3), math.log1p(20)])
    fields.add([2], ["Guitar strings"], [""])  # an update of a build row
    assert fields.title_bigram("guitar clamp", rows).tolist() == [1.0, 0.0]
    assert fields.description_length(np.array([2]))[0] == 0.0


def test_features_fill_the_new_columns_for_search_only() -> None:
    tables = tiny_tables()
    ids = np.array([1, 2, 3, 4])
    cands = Candidates(ids, np.zeros(4), np.zeros(4, np.int64))
    ctx = RankContext(RequestKind.SEARCH, query="memory card")
    x = tables.features(ctx, cands)
    assert x[:, FEATURES.index("title_bigram")].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert x[:, FEATURES.index("description_length")] == pytest.approx(
        [math.log1p(4), 0.0, math.log1p(20), math.log1p(2)]
    )
    rec = tables.features(RankContext(history_item_ids=np.array([3])), cands)
    assert not rec[:, FEATURES.index("title_bigram")].any()
    assert not rec[:, FEATURES.index("description_length")].any()


def test_old_coarse_json_loads_with_zero_weights_for_new_features(tmp_path: Path) -> None:
    old = ["recall_score", "bm25", "query_text_sim", "title_coverage"]
    path = tmp_path / "coarse.json"
    path.write_text(
        json.dumps({"features": old, "recommend": [1, 0, 0, 0], "search": [0, 4, 12, 2]})
    )
    w = LinearWeights.load(path)
    for name in ("title_bigram", "description_length", "bm25_title"):
        assert w.search[FEATURES.index(name)] == 0.0
        assert w.recommend[FEATURES.index(name)] == 0.0
    assert w.search[FEATURES.index("query_text_sim")] == 12.0
    # the hand-set defaults do not read the new features either
    d = LinearWeights.default()
    assert d.search[FEATURES.index("title_bigram")] == 0.0
    assert d.recommend[FEATURES.index("description_length")] == 0.0


def test_fitted_model_serves_the_title_pair() -> None:
    """Saved and loaded, weights on the new features rank the adjacent phrase first."""
    assert set(SEARCH_FEATURES) >= {"title_bigram", "description_length"}
    tables = tiny_tables()
    w = LinearWeights(weight_vector(), weight_vector(title_bigram=1.0, description_length=-0.1))
    engine = CoarseEngine(tables, w)
    ids = np.array([2, 3, 4, 1])
    ctx = RankContext(RequestKind.SEARCH, query="memory card")
    top = engine.rank(ctx, Candidates(ids, np.zeros(4), np.zeros(4, np.int64)), Budget(2))
    assert top.item_ids.tolist() == [4, 1]  # both have the pair; 4's description is shorter


def samples_of(n: int) -> list[QuerySample]:
    rng = np.random.default_rng(1)
    out = []
    for q in range(n):
        grades = rng.integers(0, 4, 40).astype(np.int64)
        x = np.stack([grades + rng.normal(0, 1, 40), rng.normal(0, 1, 40)], 1)
        ids = np.arange(40) + 1000 * q
        judged = {int(i): int(g) for i, g in zip(ids, grades, strict=True)}
        out.append(QuerySample(ids, x.astype(np.float32), grades, judged))
    return out


def test_out_of_fold_covers_every_query_once_with_weights_not_fitted_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = samples_of(23)
    folds = oof_folds(len(samples), 5)
    held = np.concatenate(folds)
    assert sorted(held.tolist()) == list(range(23))  # each query exactly once
    seen: list[set[int]] = []
    fit = search.fit_pairwise

    def recording(train: list[QuerySample], *args: object, **kwargs: object) -> np.ndarray:
        seen.append({int(s.item_ids[0]) // 1000 for s in train})
        return fit(train, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "fit_pairwise", recording)
    result = out_of_fold_weights(samples, [0, 1], folds=5)
    assert [t.tolist() for t, _ in result] == [f.tolist() for f in folds]
    for (test, w), trained_on in zip(result, seen, strict=True):
        assert trained_on.isdisjoint(test.tolist())
        assert trained_on | set(test.tolist()) == set(range(23))
        assert w.shape == (len(FEATURES),) and w[0] > 0  # written at the given columns


def test_fold_artifacts_changes_only_the_search_weights(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text("{}")
    (build / "lexical").mkdir()
    recommend = weight_vector(recall_score=1.0, behaviour_sim=2.0)
    LinearWeights(recommend, weight_vector(bm25=3.0)).save(build / "coarse.json")
    fold = fold_artifacts(build, weight_vector(title_bigram=2.0), tmp_path / "fold" / "artifacts")
    assert (fold / "manifest.json").is_symlink() and (fold / "lexical").is_symlink()
    assert not (fold / "coarse.json").is_symlink()
    got = LinearWeights.load(fold / "coarse.json")
    assert np.array_equal(got.recommend, recommend)
    assert got.search.tolist() == weight_vector(title_bigram=2.0).tolist()
    assert LinearWeights.load(build / "coarse.json").search[FEATURES.index("bm25")] == 3.0
    q = LabelledQueries(["a", "b", "c"], ["x", "y", "z"], [{1: 1}, {2: 2}, {3: 3}])
    assert subset(q, [2, 0]).texts == ["z", "x"]
    assert subset(q, [2, 0]).judgments == [{3: 3}, {1: 1}]
