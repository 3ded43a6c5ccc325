"""Regression floor on real data: fails when ranking quality drops below measured levels.

* Recommend: a fixed subset of Amazon Beauty (the 2,000 items most often seen
  before users' last interactions, users with >= 5 interactions among them,
  1,500 of those users), built by the real ``sluice build`` pipeline with
  ``--holdout 1`` and a small ranker (4 epochs), evaluated leave-one-out for 800 users
  through the in-process cascade (``LocalStages`` + ``Gateway``, history excluded, page 10).
* Search: CrowdFlower product search, whole corpus, NDCG@10: plain BM25
  (the dataset's reference setting) and the cascade's own recall + coarse
  combination (BM25 fields + MiniLM title vectors) with 5-fold CV over the
  judged queries.

Floors sit below the values measured when they were set (see
``docs/quality.md``, "Regression floor"), with room for run-to-run noise.
The data lives outside the repository at ``../shared/data`` (relative to the
repository root; ``SLUICE_SHARED_DATA`` overrides). Missing data FAILS the
test: a quality gate that silently skips is no gate.
"""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from sluice.artifacts import Artifacts

pytestmark = pytest.mark.quality

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SLUICE_SHARED_DATA", ROOT.parent / "shared" / "data"))

SUBSET_ITEMS = 2000
SUBSET_USERS = 1500
EVAL_USERS = 800
EPOCHS = 4  # fixed, so the floor does not move with the machine's load
PAGE = 10

# The rule (docs/quality.md, "Regression floor"): a floor is the value measured here minus 3
# standard errors of it (bootstrap over the users, or queries; printed by each test), rounded
# down. The search floors are above that rule (0.658, 0.730) and stay where they were.
FLOORS = {
    "recommend_hr10": 0.124,  # measured 0.1638, s.e. 0.0130
    "recommend_ndcg10": 0.071,  # measured 0.0973, s.e. 0.0086
    "bm25_plain_ndcg10": 0.70,  # measured 0.7236, s.e. 0.0216 (the dataset's reference: 0.720)
    "search_cv_ndcg10": 0.74,  # measured 0.7804, s.e. 0.0168 (5 features; 0.7758 with 3)
}


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"quality data missing: {path} does not exist. The regression floor needs the shared "
            f"data at {SHARED} (../shared/data from the repository root, or SLUICE_SHARED_DATA)",
            pytrace=False,
        )
    return path


# -- recommend ---------------------------------------------------------------------------------
def write_beauty_subset(src: Path, dst: Path, items: int, users: int, seed: int = 0) -> None:
    """A dense, seeded subset of Amazon Beauty in the same layout (no test target leaks into
    the item choice: items are ranked by counts of everything before users' last items)."""
    from sluice.data.interactions import load_catalog, load_interactions

    catalog = load_catalog(src)
    log = load_interactions(src, catalog)
    seqs = log.sequences()
    stamps = log.time_sequences()
    counts = np.bincount(np.concatenate([s[:-1] for s in seqs]), minlength=len(catalog))
    keep = np.zeros(len(catalog), dtype=bool)
    keep[np.argsort(-counts, kind="stable")[:items]] = True
    eligible = [u for u, s in enumerate(seqs) if keep[s].sum() >= 5]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, min(users, len(eligible)), replace=False))
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "items.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(["item_id", "title"])
        for r in np.flatnonzero(keep).tolist():
            w.writerow([int(catalog.item_ids[r]), catalog.titles[r].replace("\t", " ")])
    with gzip.open(dst / "interactions.tsv.gz", "wt", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in chosen.tolist():
            for r, t in zip(seqs[u].tolist(), stamps[u].tolist(), strict=True):
                if keep[r]:
                    w.writerow([log.user_ids[u], int(catalog.item_ids[r]), t])


@pytest.fixture(scope="session")
def beauty_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Artifacts]:
    from sluice.build.pipeline import BuildOptions, build
    from sluice.fine.model import RankerConfig

    src = _require(SHARED / "amazon-beauty")
    _require(src / "interactions.tsv.gz")
    root = tmp_path_factory.mktemp("quality-beauty")
    data = root / "data"
    write_beauty_subset(src, data, SUBSET_ITEMS, SUBSET_USERS)
    options = BuildOptions(
        out=root / "artifacts",
        data=data,
        model_repository=root / "model_repository",
        holdout=1,
        epochs=EPOCHS,
        train_budget_s=600.0,  # never the limit: EPOCHS is
        ranker=RankerConfig(dim=32, layers=1, patience=EPOCHS),
        coarse_users=150,
        cache_dir=ROOT / "var" / "cache",
        progress=False,
    )
    return data, build(options)


def bootstrap_se(values: np.ndarray | list[float]) -> float:
    """The standard error of the mean of per-user (or per-query) values, by bootstrap
    resamples of the users: the unit of the floors' rule."""
    from scipy.stats import bootstrap

    found = bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=2000, rng=0)
    return float(found.standard_error)


def test_recommend_floor(beauty_build: tuple[Path, Artifacts]) -> None:
    from sluice.eval.baselines import PopularityModel
    from sluice.eval.metrics import evaluate
    from sluice.eval.replay import per_user
    from sluice.eval.served import in_process_pages, list_metrics, load_split, sample_users

    data, a = beauty_build
    split = load_split(data, a)
    users = sample_users(split, EVAL_USERS, seed=0)
    run = in_process_pages(split, users, page_size=PAGE, progress=False)
    served = list_metrics(run.page, split, users)
    targets = np.full(len(split.test), -1)
    targets[users] = split.test[users]
    pop = evaluate(
        PopularityModel.fit(split.histories, split.num_items).scores, split.histories, targets
    )
    hr, ndcg = per_user(run.page, split.test[users])
    print(
        f"\nrecommend subset: cascade HR@10 {served['HR@10']:.4f} (s.e. {bootstrap_se(hr):.4f}) "
        f"NDCG@10 {served['NDCG@10']:.4f} (s.e. {bootstrap_se(ndcg):.4f}); "
        f"popularity HR@10 {pop['HR@10']:.4f}; degraded {run.degraded}"
    )
    assert run.degraded == 0
    assert served["HR@10"] >= FLOORS["recommend_hr10"], served
    assert served["NDCG@10"] >= FLOORS["recommend_ndcg10"], served
    assert served["HR@10"] > 1.5 * pop["HR@10"], (served, pop)


# -- search ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def crowdflower() -> Path:
    d = _require(SHARED / "crowdflower-search")
    for name in ("products.jsonl", "queries.jsonl", "qrels.tsv"):
        _require(d / name)
    return d


def test_bm25_floor(crowdflower: Path) -> None:
    from sluice.data.products import load_products, load_queries
    from sluice.eval.search import bm25_rankings, ndcg_at_k

    catalog, queries = load_products(crowdflower), load_queries(crowdflower)
    rankings = bm25_rankings(catalog, queries, stem=False)
    per_query = [ndcg_at_k(r, j) for r, j in zip(rankings, queries.judgments, strict=True)]
    value = float(np.mean(per_query))
    print(f"\nBM25 plain NDCG@10 {value:.4f} (s.e. {bootstrap_se(per_query):.4f})")
    assert abs(value - 0.720) < 0.02  # the dataset's published reference setting
    assert value >= FLOORS["bm25_plain_ndcg10"]


def test_search_combination_floor(crowdflower: Path) -> None:
    from sluice.coarse.engine import FEATURES, SEARCH_FEATURES
    from sluice.data.products import load_products, load_queries
    from sluice.eval.search import cross_validate, in_process_search_cascade, query_encoder

    catalog, queries = load_products(crowdflower), load_queries(crowdflower)
    samples = in_process_search_cascade(
        catalog, queries, query_encoder(queries.texts), ROOT / "var" / "cache"
    )
    columns = [FEATURES.index(f) for f in SEARCH_FEATURES]
    cv = cross_validate(samples, columns, folds=5, repeats=1)
    se = bootstrap_se(cv["per_query"])
    print(
        f"\nsearch combination (title vectors) 5-fold CV NDCG@10 {cv['mean']:.4f} (s.e. {se:.4f})"
    )
    assert cv["mean"] >= FLOORS["search_cv_ndcg10"], cv
