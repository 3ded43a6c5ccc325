"""Small checks of the evaluation code itself (no data, no builds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sluice.data.products import (
    LabelledQueries,
    is_search_only,
    load_products,
    load_queries,
    product_id_of,
    product_number,
)
from sluice.eval.recall_ceiling import kept
from sluice.eval.search import (
    QuerySample,
    against_baseline,
    cross_validate,
    fit_pairwise,
    ndcg_at_k,
)
from sluice.eval.served import biggest_loss, compare_pages, hit_rate, save_pages


def test_ndcg_graded_gain_and_unjudged_zero() -> None:
    judged = {1: 3, 2: 1, 3: 0}
    ideal = (7 + 1 / math.log2(3)) / 1.0
    assert ndcg_at_k([1, 2], judged) == pytest.approx(1.0)
    assert ndcg_at_k([2, 1], judged) == pytest.approx((1 + 7 / math.log2(3)) / ideal)
    assert ndcg_at_k([9, 1], judged) == pytest.approx((7 / math.log2(3)) / ideal)  # 9 unjudged
    assert ndcg_at_k([], judged) == 0.0
    assert ndcg_at_k([1], {1: 0}) == 0.0  # nothing relevant: 0, not NaN
    assert ndcg_at_k(list(range(20)), {15: 3}, k=10) == 0.0


def test_products_layout(tmp_path: Path) -> None:
    rows = [
        {"product_id": "p00002", "title": "Red  Pillow", "description": "soft"},
        {"product_id": "p00010", "title": "Blue lamp", "description": ""},
    ]
    (tmp_path / "products.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"query_id": "q1", "query": "pillow"}))
    (tmp_path / "qrels.tsv").write_text("q1 0 p00002 3\nq1 0 p00010 0\nq9 0 p00002 1\n")
    assert is_search_only(tmp_path)
    catalog = load_products(tmp_path)
    assert catalog.item_ids.tolist() == [2, 10]
    assert catalog.titles[0] == "Red Pillow"
    assert catalog.descriptions == ["soft", ""]
    queries = load_queries(tmp_path)
    assert queries.texts == ["pillow"]
    assert queries.judgments == [{2: 3, 10: 0}]
    assert product_number("p00001") == 1
    assert product_id_of(1) == "p00001"


def test_pairwise_fit_recovers_the_useful_feature() -> None:
    rng = np.random.default_rng(0)
    samples = []
    for q in range(30):
        n = 60
        grades = rng.integers(0, 4, n)
        x = np.zeros((n, 3), np.float32)
        x[:, 0] = grades + rng.normal(0, 0.5, n)  # informative
        x[:, 1] = rng.normal(0, 1, n)  # noise
        ids = np.arange(n) + 1000 * q
        judged = {int(i): int(g) for i, g in zip(ids, grades, strict=True)}
        samples.append(QuerySample(ids, x, grades.astype(np.int64), judged))
    w = fit_pairwise(samples, [0, 1])
    assert w[0] > 5 * abs(w[1])
    cv = cross_validate(samples, [0, 1], folds=3, repeats=1)
    assert cv["mean"] > 0.9


def test_stage_recall_helpers() -> None:
    lists = [np.array([5, 6, 7]), np.array([1, 2]), np.array([], dtype=np.int64)]
    assert hit_rate(lists, np.array([6, 9, 1]), 2) == pytest.approx(1 / 3)
    worst, losses = biggest_loss(
        {"recall@1000": 0.8, "coarse@200": 0.7, "fine@10": 0.1, "page@10": 0.09}
    )
    assert worst.startswith("fine")
    assert losses["recall (catalog → 1000)"] == pytest.approx(0.2)


def test_recall_ceiling_counts_the_top_k_without_the_history_and_ties_in_expectation() -> None:
    scores = np.array([9.0, 5.0, 5.0, 5.0, 1.0, 8.0])
    history = np.array([0])  # the best item is already bought: not a slot
    assert kept(scores, history, target=5, k=1) == 1.0
    assert kept(scores, history, target=4, k=5) == 1.0
    assert kept(scores, history, target=4, k=4) == 0.0
    assert kept(scores, history, target=2, k=2) == pytest.approx(1 / 3)  # 1 slot, 3 tied
    assert kept(scores, history, target=2, k=4) == 1.0
    assert kept(scores, history, target=0, k=6) == 0.0  # a history item is never kept


def test_a_search_run_against_a_baseline_is_compared_query_by_query(tmp_path: Path) -> None:
    queries = LabelledQueries(
        [f"q{i}" for i in range(6)], [f"text {i}" for i in range(6)], [{1: 3, 2: 1}] * 6
    )
    worse = [[9, 8, 1]] * 6  # the relevant item third
    baseline = tmp_path / "search-report.json"
    baseline.write_text(json.dumps({"served_out_of_fold": {"rankings": worse}}))
    same = against_baseline(worse, baseline, queries)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    better = against_baseline([[1, 2, 9]] * 5 + worse[:1], baseline, queries)
    assert 0 < better["low"] <= better["difference"] <= better["high"]
    with pytest.raises(ValueError, match="ranks 6 queries"):
        against_baseline(worse[:5], baseline, queries)
    for text in ("{}", "not json", '{"served_out_of_fold": {"ndcg10": 0.8}}'):
        baseline.write_text(text)  # a run without the served out-of-fold step, or garbage
        with pytest.raises(ValueError, match="holds no served out-of-fold rankings"):
            against_baseline(worse, baseline, queries)
    with pytest.raises(ValueError, match="holds no served out-of-fold rankings"):
        against_baseline(worse, tmp_path / "missing.json", queries)


def test_recommend_pages_are_compared_user_by_user(tmp_path: Path) -> None:
    """``eval recommend --pages``: a second run's pages against the first's, per user."""
    rng = np.random.default_rng(0)
    users = np.arange(40)
    targets = rng.integers(0, 100, 40)
    # pages without the target; then half the users find it at place 1
    before = [rng.permutation(np.setdiff1d(np.arange(100), [t]))[:50] for t in targets]
    for page, t in zip(before[:20], targets[:20], strict=True):
        page[0] = t
    path = tmp_path / "pages"
    save_pages(path, users, targets, before)
    assert path.exists()  # the name as given, no ".npz" added
    same = compare_pages(path, users, targets, before)
    assert (same["same_top10"], same["same_page"]) == (40, 40)
    assert same["HR@10"]["baseline"] == same["HR@10"]["now"] == 0.5
    assert same["HR@10"]["difference"] == same["NDCG@10"]["low"] == 0.0
    after = [p.copy() for p in before]
    for page in after[:10]:  # ten hits fall from place 1 to place 11: a drop
        page[[0, 10]] = page[[10, 0]]
    after[39] = after[39][:49]  # a shorter page, its top 10 unchanged
    worse = compare_pages(path, users, targets, after)
    assert (worse["same_top10"], worse["same_page"]) == (30, 29)
    assert worse["HR@10"]["now"] == 0.25
    assert worse["HR@10"]["difference"] == -0.25
    assert worse["HR@10"]["high"] < 0 and worse["NDCG@10"]["high"] < 0
    with pytest.raises(ValueError, match="other users"):
        compare_pages(path, users[:39], targets[:39], after[:39])


def test_a_cached_eval_build_is_found_however_its_dataset_path_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build recorded with an absolute path is reused when a run names the same folder by
    a relative one (another checkout): no 20-minute rebuild. Another folder is not reused."""
    from sluice.eval import served

    data = tmp_path / "data" / "shop"
    data.mkdir(parents=True)
    root = tmp_path / "eval"
    (root / "artifacts").mkdir(parents=True)
    manifest = {"dataset": str(data.resolve()), "holdout": 1, "text_encoder": "minilm"}
    (root / "artifacts" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path / "data")
    found = served.ensure_build(Path("shop"), holdout=1, root=root, progress=False)
    assert found.root == root / "artifacts"
    built: list[Path] = []

    def stand_in(options: object) -> str:
        out: Path = options.out  # type: ignore[attr-defined]
        out.mkdir(parents=True)
        built.append(out)
        return "built"

    monkeypatch.setattr("sluice.build.pipeline.build", stand_in)
    (tmp_path / "data" / "other").mkdir()
    assert served.ensure_build(Path("other"), holdout=1, root=root, progress=False) == "built"
    assert built == [root / "artifacts"]
