"""Search quality on labelled queries: served Search, BM25 baselines, the learned combination.

``python -m sluice.eval search --data ../shared/data/crowdflower-search`` (or
``sluice eval search ...``).

Protocol (the one of ``crowdflower-search/README``): retrieve from the WHOLE
corpus; NDCG@10 with gain ``2^grade - 1`` where unjudged products count as
grade 0, the ideal ranking built from all of the query's judgments; the mean
over queries.

What is measured, all by the same NDCG code:

* **BM25 baselines** over the whole corpus, title counted twice plus the
  description, k1 1.2, b 0.75: plain lower-cased word tokens (the reference
  0.720 of the dataset's README) and the project's tokenizer (English stems).
* **dense** — all-MiniLM-L6-v2 cosine between the query and the item text.
* **coarse combination, k-fold CV** — the cascade's own recall candidates and
  coarse features (:mod:`sluice.coarse.engine`) for every query; the search
  weights are fitted on the training folds' judgments (pairwise logistic
  regression over a handful of features) and scored on the held-out fold.
  This estimates how the learned combination generalizes to unseen queries.
* **served** — the build (weights fitted on every labelled query) behind the
  real gateway: every query's ``Search`` (page size 10) over gRPC.
* **served out of fold** — the same, but every query is served by a copy of
  the build whose search weights were fitted on the other folds (the folds of
  the CV's first repeat; one cluster per fold).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.data.products import LabelledQueries, load_queries
from sluice.eval.served import EVAL_ROOT, ensure_build, eval_dir, fan_out

K = 10
CACHE = paths.var("cache")


# -- the metric -----------------------------------------------------------------------------
def ndcg_at_k(
    ranked_item_ids: Sequence[int] | np.ndarray, judged: Mapping[int, int], k: int = K
) -> float:
    """NDCG@k with gain ``2^grade - 1``; unjudged items are grade 0; 0 when nothing is relevant."""
    dcg = sum(
        (2.0 ** judged.get(int(item), 0) - 1.0) / math.log2(rank + 2)
        for rank, item in enumerate(list(ranked_item_ids)[:k])
    )
    ideal = sorted((2.0**g - 1.0 for g in judged.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mean_ndcg(
    rankings: Sequence[Sequence[int] | np.ndarray], queries: LabelledQueries, k: int = K
) -> float:
    """Mean NDCG@k over the queries (rankings are item ids, one list per query)."""
    values = [ndcg_at_k(r, j, k) for r, j in zip(rankings, queries.judgments, strict=True)]
    return float(np.mean(values)) if values else 0.0


# -- whole-corpus baselines ----------------------------------------------------------------
def bm25_rankings(
    catalog: Catalog, queries: LabelledQueries, *, stem: bool, k: int = K
) -> list[np.ndarray]:
    """BM25 (k1 1.2, b 0.75) over title twice + description, the project's lexical index."""
    from sluice.recall.lexical import LexicalIndex

    index = LexicalIndex.build(catalog.titles, catalog.descriptions or None, stem=stem)
    return [catalog.item_ids[index.search(q, k)[0]] for q in queries.texts]


def dense_rankings(
    catalog: Catalog, item_vectors: np.ndarray, query_vectors: np.ndarray, k: int = K
) -> list[np.ndarray]:
    """MiniLM cosine between each query and every item."""
    scores = query_vectors @ item_vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [catalog.item_ids[row] for row in top]


# -- the cascade's coarse features for the labelled queries ------------------------------
@dataclass
class QuerySample:
    """One labelled query's recall candidates: their coarse features and grades."""

    item_ids: np.ndarray  # int64 [n], recall order
    features: np.ndarray  # float32 [n, len(FEATURES)]
    grades: np.ndarray  # int64 [n], unjudged = 0
    judged: dict[int, int]


def query_encoder(known: Sequence[str] = ()) -> Callable[[str], np.ndarray]:
    """The gateway's query encoder (MiniLM of the lower-cased, space-normalised query).

    ``known`` queries are encoded up front in one batch (one at a time, MiniLM
    spends most of a loaded CPU on overhead); others go through the gateway's
    :class:`~sluice.gateway.pipeline.QueryEncoder`.
    """
    from sluice.embed.text import MiniLMEncoder
    from sluice.gateway.pipeline import QueryEncoder

    model = MiniLMEncoder()
    single = QueryEncoder(model.encode)

    def key(query: str) -> str:
        return " ".join(query.lower().split())  # as QueryEncoder normalises

    keys = list(dict.fromkeys(key(q) for q in known))
    table = dict(zip(keys, model.encode(keys), strict=True)) if keys else {}

    def encode(query: str) -> np.ndarray:
        hit = table.get(key(query))
        return hit if hit is not None else single(query)

    return encode


def collect_samples(
    artifacts: Artifacts,
    queries: LabelledQueries,
    encode: Callable[[str], np.ndarray],
    recall_budget: int = 1000,
) -> list[QuerySample]:
    """Recall each query as the gateway would (no user) and compute the coarse features."""
    from sluice.coarse.engine import FeatureTables
    from sluice.recall.engine import RecallAssets, RecallEngine

    recaller = RecallEngine(RecallAssets.from_artifacts(artifacts))
    tables = FeatureTables.from_artifacts(artifacts)
    return samples_from(recaller, tables, queries, encode, recall_budget)


def samples_from(
    recaller: Any,
    tables: Any,
    queries: LabelledQueries,
    encode: Callable[[str], np.ndarray],
    recall_budget: int = 1000,
) -> list[QuerySample]:
    """:func:`collect_samples` over given recall assets and feature tables."""
    from sluice.domain import Budget, RankContext, RequestKind

    out = []
    for text, judged in zip(queries.texts, queries.judgments, strict=True):
        query = text.strip()
        ctx = RankContext(RequestKind.SEARCH, query=query, query_embedding=encode(query))
        cands = recaller.retrieve(ctx, Budget(recall_budget))
        grades = np.array([judged.get(int(i), 0) for i in cands.item_ids], dtype=np.int64)
        out.append(QuerySample(cands.item_ids, tables.features(ctx, cands), grades, judged))
    return out


def title_table(catalog: Catalog, cache_dir: Path, progress: bool = False) -> np.ndarray:
    """MiniLM embeddings of titles alone ``[n, 384]``, cached (fast beside descriptions)."""
    import hashlib

    digest = hashlib.sha1("\n".join(catalog.titles).encode()).hexdigest()[:12]
    path = cache_dir / f"title-only-{len(catalog)}-{digest}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        return cached
    from sluice.embed.text import MiniLMEncoder

    vectors = MiniLMEncoder().encode(catalog.titles, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def in_process_search_cascade(
    catalog: Catalog,
    queries: LabelledQueries,
    encode: Callable[[str], np.ndarray],
    cache_dir: Path,
) -> list[QuerySample]:
    """Recall + coarse features for a search-only catalog without a full build.

    The item text vectors are MiniLM of the titles alone (fast to compute and
    cached), the lexical index the project's; no behaviour, no popularity.
    Used by the regression floor, where embedding every description is too slow.
    """
    from scipy import sparse

    from sluice.coarse.engine import FeatureTables
    from sluice.recall.ann_index import AnnIndex, build_index
    from sluice.recall.engine import RecallAssets, RecallEngine, StaticPopularity
    from sluice.recall.lexical import LexicalIndex

    n = len(catalog)
    vectors = np.ascontiguousarray(title_table(catalog, cache_dir, progress=False))
    index = AnnIndex(build_index(vectors, "flat"))
    lexical = LexicalIndex.build(catalog.titles, catalog.descriptions or None)
    popularity = np.zeros(n, np.float32)
    assets = RecallAssets(
        catalog=catalog,
        behaviour_vectors=vectors,
        behaviour_index=index,
        text_index=index,
        lexical=lexical,
        cooc_rows=np.full((n, 1), -1, np.int64),
        cooc_scores=np.zeros((n, 1), np.float32),
        popularity=StaticPopularity(popularity),
    )
    tables = FeatureTables(
        catalog=catalog,
        behaviour_vectors=vectors,
        text_vectors=vectors,
        lexical=lexical,
        cooc=sparse.csr_matrix((n, n), dtype=np.float32),
        popularity=popularity,
    )
    return samples_from(RecallEngine(assets), tables, queries, encode)


def pairwise_data(
    samples: Sequence[QuerySample],
    columns: Sequence[int],
    pairs_per_query: int = 3000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature differences of (better, worse) pairs within each query, both orientations.

    A pair's weight is its gain difference ``|2^g_a - 2^g_b|`` (a grade-3
    product over an unjudged one matters more than grade 2 over grade 1);
    each query gets the same total weight, so queries with many judgments do
    not dominate.
    """
    rng = np.random.default_rng(seed)
    xs, ys, ws = [], [], []
    for s in samples:
        g = s.grades
        if g.max(initial=0) == 0:
            continue
        a = rng.integers(len(g), size=pairs_per_query * 4)
        b = rng.integers(len(g), size=pairs_per_query * 4)
        keep = g[a] > g[b]
        a, b = a[keep][:pairs_per_query], b[keep][:pairs_per_query]
        if len(a) == 0:
            continue
        x = s.features[a][:, columns] - s.features[b][:, columns]
        w = (2.0 ** g[a] - 2.0 ** g[b]).astype(np.float64)
        w = w / w.sum()
        xs += [x, -x]
        ys += [np.ones(len(a)), np.zeros(len(a))]
        ws += [w, w]
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def fit_pairwise(
    samples: Sequence[QuerySample], columns: Sequence[int], c: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Linear weights over ``columns`` by pairwise logistic regression (no intercept)."""
    from sklearn.linear_model import LogisticRegression

    x, y, w = pairwise_data(samples, columns, seed=seed)
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000)
    model.fit(x, y, sample_weight=w * len(samples))
    return np.asarray(model.coef_[0], dtype=np.float32)


def rank_sample(s: QuerySample, weights: np.ndarray, columns: Sequence[int], k: int = K) -> list:
    score = s.features[:, columns] @ weights
    return s.item_ids[np.argsort(-score, kind="stable")[:k]].tolist()


def sample_ndcg(
    samples: Sequence[QuerySample], weights: np.ndarray, columns: Sequence[int]
) -> float:
    return float(np.mean([ndcg_at_k(rank_sample(s, weights, columns), s.judged) for s in samples]))


def cross_validate(
    samples: Sequence[QuerySample],
    columns: Sequence[int],
    folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
    c: float = 1.0,
) -> dict[str, Any]:
    """k-fold CV over queries (repeated with reshuffled folds): NDCG@10 of held-out folds,
    and each query's held-out NDCG@10 (``per_query``, its mean over the repeats)."""
    per_repeat = []
    fold_values = []
    n = len(samples)
    per_query = np.zeros(n)
    for r in range(repeats):
        order = np.random.default_rng(seed + r).permutation(n)
        held = np.zeros(n)
        for f in range(folds):
            test = order[f::folds]
            train = np.setdiff1d(order, test)
            w = fit_pairwise([samples[i] for i in train], columns, c=c, seed=seed)
            values = [
                ndcg_at_k(rank_sample(samples[i], w, columns), samples[i].judged) for i in test
            ]
            held[test] = values
            fold_values.append(float(np.mean(values)))
        per_repeat.append(float(held.mean()))
        per_query += held / repeats
    return {
        "folds": folds,
        "repeats": repeats,
        "mean": float(np.mean(per_repeat)),
        "per_repeat": per_repeat,
        "fold_std": float(np.std(fold_values)),
        "per_query": per_query.tolist(),
    }


def oof_folds(n: int, folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """The query indices of each fold: the folds of :func:`cross_validate`'s first repeat."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[f::folds]) for f in range(folds)]


def out_of_fold_weights(
    samples: Sequence[QuerySample],
    columns: Sequence[int],
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(held-out query indices, search weights over all FEATURES fitted without them) per fold.

    Every query is in exactly one fold, and that fold's weights never saw it.
    """
    from sluice.coarse.engine import FEATURES

    out = []
    for test in oof_folds(len(samples), folds, seed):
        train = np.setdiff1d(np.arange(len(samples)), test)
        w = np.zeros(len(FEATURES), np.float32)
        w[list(columns)] = fit_pairwise([samples[i] for i in train], columns, c=c, seed=seed)
        out.append((test, w))
    return out


def fold_artifacts(artifacts: Path, search_weights: np.ndarray, dest: Path) -> Path:
    """A copy of the build at ``dest`` whose coarse search weights are ``search_weights``.

    Every file but ``coarse.json`` is a symbolic link to the build's (the model repository
    is named by absolute path in the manifest, so Triton serves the same ranker)."""
    from sluice.coarse.engine import LinearWeights

    dest.mkdir(parents=True, exist_ok=True)
    for entry in artifacts.resolve().iterdir():
        if entry.name != "coarse.json" and not (dest / entry.name).exists():
            (dest / entry.name).symlink_to(entry)
    built = LinearWeights.load(artifacts / "coarse.json")
    LinearWeights(built.recommend, np.asarray(search_weights, np.float32)).save(
        dest / "coarse.json"
    )
    return dest


def as_searched(catalog: Catalog, queries: LabelledQueries) -> LabelledQueries:
    """The queries as the gateway searches them: with its spelling correction when its
    settings have it on (``SLUICE_GATEWAY_SPELL_CORRECTION``, :mod:`sluice.gateway.spelling`),
    so that weights are fitted, and cross-validated, on what is served."""
    from sluice.gateway.spelling import speller_for

    speller = speller_for(catalog)
    if speller is None:
        return queries
    texts = [speller.correct(t.strip()) for t in queries.texts]
    return LabelledQueries(queries.query_ids, texts, queries.judgments)


def subset(queries: LabelledQueries, indices: Sequence[int] | np.ndarray) -> LabelledQueries:
    """The queries at ``indices``, in that order."""
    return LabelledQueries(
        [queries.query_ids[i] for i in indices],
        [queries.texts[i] for i in indices],
        [queries.judgments[i] for i in indices],
    )


def served_on(
    artifacts: Path, queries: LabelledQueries, log_dir: Path, threads: int = 4
) -> tuple[list[list[int]], int, float]:
    """Start the cluster on ``artifacts``, serve every query's ``Search``, stop it:
    (item ids per query, degraded responses, seconds serving)."""
    from sluice.launch import Cluster, Ports

    with tempfile.TemporaryDirectory(prefix="sluice-eval-") as tmp:
        cluster = Cluster(
            artifacts=artifacts,
            ports=Ports.random(),
            log_dir=log_dir,
            event_log_dir=Path(tmp) / "events",
        )
        print(f"starting Triton and the services (logs in {log_dir}) …", flush=True)
        cluster.start(timeout_s=600)
        try:
            t0 = time.perf_counter()
            rankings, degraded = served_search(cluster.gateway_address, queries, threads=threads)
            seconds = time.perf_counter() - t0
        finally:
            cluster.stop()
    return rankings, degraded, seconds


def served_out_of_fold(
    artifacts: Path,
    queries: LabelledQueries,
    samples: Sequence[QuerySample],
    columns: Sequence[int],
    work: Path,
    folds: int = 5,
    threads: int = 4,
) -> tuple[list[list[int]], int, float]:
    """Every query served over gRPC by a build whose search weights were fitted without it:
    per fold, a copy of the build with that fold's weights behind its own cluster."""
    rankings: list[list[int]] = [[] for _ in range(len(queries))]
    degraded, seconds = 0, 0.0
    for f, (test, w) in enumerate(out_of_fold_weights(samples, columns, folds)):
        with tempfile.TemporaryDirectory(prefix=f"fold{f}-", dir=work) as tmp:
            root = fold_artifacts(artifacts, w, Path(tmp) / "artifacts")
            got, d, sec = served_on(root, subset(queries, test), work / "logs", threads)
        for i, r in zip(test, got, strict=True):
            rankings[int(i)] = r
        degraded, seconds = degraded + d, seconds + sec
    return rankings, degraded, seconds


def in_process_rankings(
    artifacts: Artifacts,
    queries: LabelledQueries,
    encode: Callable[[str], np.ndarray],
    search_diversity_lambda: float | None = None,
) -> list[list[int]]:
    """Every query through the gateway logic and the four stages in this process (the
    rerank stage's search MMR lambda as deployed, or the one given)."""
    from sluice.eval.served import in_process_gateway, local_stages

    a = artifacts
    rerank = (
        {}
        if search_diversity_lambda is None
        else {"search_diversity_lambda": search_diversity_lambda}
    )
    stages = local_stages(a, rerank=rerank)
    gateway = in_process_gateway(a, stages, encode)
    return [
        gateway.search(query=q, page_size=K, deadline_s=30.0).candidates.item_ids.tolist()
        for q in queries.texts
    ]


# -- served ----------------------------------------------------------------------------------
def served_search(
    address: str,
    queries: LabelledQueries,
    *,
    page_size: int = K,
    threads: int = 4,
    timeout_s: float = 30.0,
    progress: bool = False,
) -> tuple[list[list[int]], int]:
    """Every query's ``Search`` through the gateway; (item ids per query, degraded responses)."""
    from sluice.client import StorefrontClient

    client = StorefrontClient(address)
    degraded = [0] * len(queries)

    def one(i: int) -> list[int]:
        resp = client.search(queries.texts[i], page_size=page_size, timeout_s=timeout_s)
        degraded[i] = int(any(s.degraded for s in resp.stages))
        return list(resp.page.item_ids)

    try:
        rankings = fan_out(one, len(queries), threads, progress, "served Search")
    finally:
        client.close()
    return rankings, sum(degraded)


# -- the whole run ----------------------------------------------------------------------------
@dataclass
class SearchOptions:
    data: Path
    rebuild: bool = False
    served: bool = True
    out_of_fold: bool = True
    cv: bool = True
    folds: int = 5
    repeats: int = 3
    threads: int = 4
    progress: bool = True
    root: Path | None = None
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    baseline: Path | None = None
    """Another run's search-report.json: its served out-of-fold rankings are compared with
    this run's, query by query (a paired bootstrap over the queries)."""


def baseline_rankings(baseline: Path) -> list[list[int]]:
    """The served out-of-fold rankings of another run's search-report.json; ValueError when
    the file cannot give them (checked before a run starts, not after it)."""
    try:
        report = json.loads(baseline.read_text())
        rankings: list[list[int]] = report["served_out_of_fold"]["rankings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{baseline} holds no served out-of-fold rankings (a search-report.json of a run "
            f"with the served out-of-fold step): {err!r}"
        ) from err
    return rankings


def against_baseline(
    rankings: Sequence[Sequence[int]], baseline: Path, queries: LabelledQueries
) -> dict[str, float]:
    """This run's per-query NDCG@10 minus the baseline report's, with its 95% paired-bootstrap
    interval over the queries (:func:`sluice.eval.arms.paired_difference`)."""
    from sluice.eval.arms import paired_difference

    before = baseline_rankings(baseline)
    if len(before) != len(rankings):
        raise ValueError(f"{baseline} ranks {len(before)} queries, this run {len(rankings)}")

    def per_query(lists: Sequence[Sequence[int]]) -> np.ndarray:
        return np.array([ndcg_at_k(r, j) for r, j in zip(lists, queries.judgments, strict=True)])

    return paired_difference(per_query(before), per_query(rankings))


def run_search(opts: SearchOptions) -> dict[str, Any]:
    from sluice.coarse.engine import FEATURES, SEARCH_FEATURES
    from sluice.config import RerankSettings

    base = opts.root or eval_dir(opts.data, EVAL_ROOT)
    artifacts = ensure_build(
        opts.data,
        holdout=0,
        rebuild=opts.rebuild,
        root=base,
        progress=opts.progress,
        **opts.build_kwargs,
    )
    catalog = artifacts.catalog
    queries = load_queries(opts.data)
    report: dict[str, Any] = {
        "dataset": str(opts.data),
        "text_encoder": opts.build_kwargs.get("encoder", "minilm"),
        "queries": len(queries),
        "judgments": sum(len(j) for j in queries.judgments),
        "protocol": "whole corpus; NDCG@10, gain 2^grade-1, unjudged = 0; mean over queries",
    }
    rows: list[tuple[str, float, str]] = []

    def add(name: str, value: float, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"| {name} | {value:.4f} | {note} |", flush=True)

    print(
        f"\n{opts.data.name}: {len(queries)} queries, {len(catalog)} products, "
        f"text encoder {report['text_encoder']}"
    )
    print("| ranking | NDCG@10 | note |\n|---|---|---|")
    add(
        "BM25 plain tokens (title x2 + description)",
        mean_ndcg(bm25_rankings(catalog, queries, stem=False), queries),
        "the dataset's reference setting (README: 0.720)",
    )
    add(
        "BM25 project tokenizer (English stems)",
        mean_ndcg(bm25_rankings(catalog, queries, stem=True), queries),
        "the lexical index recall serves",
    )
    searched = as_searched(catalog, queries)  # the served cascade's rows read these
    encode = query_encoder([*queries.texts, *searched.texts])
    qv = np.stack([encode(q.strip()) for q in queries.texts])
    add(
        "dense MiniLM (title + description)",
        mean_ndcg(dense_rankings(catalog, artifacts.text_vectors, qv), queries),
    )
    add(
        "dense MiniLM (title)",
        mean_ndcg(dense_rankings(catalog, title_table(catalog, CACHE), qv), queries),
        "the vectors of the regression floor's in-process cascade",
    )

    samples = collect_samples(artifacts, searched, encode)
    columns = [FEATURES.index(f) for f in SEARCH_FEATURES]
    recall_1000 = float(
        np.mean(
            [
                (s.grades > 0).sum() / max(sum(1 for g in s.judged.values() if g > 0), 1)
                for s in samples
            ]
        )
    )
    report["recall_relevant@1000"] = recall_1000
    from sluice.coarse.engine import LinearWeights

    built = LinearWeights.load(artifacts.root / "coarse.json").search
    add(
        "coarse combination as built, in process (no fine/rerank)",
        float(
            np.mean(
                [ndcg_at_k(rank_sample(s, built, range(len(FEATURES))), s.judged) for s in samples]
            )
        ),
        "weights fitted on all labelled queries: in-sample",
    )
    if opts.cv:
        cv = cross_validate(samples, columns, folds=opts.folds, repeats=opts.repeats)
        report["cv"] = cv
        add(
            f"coarse combination, {opts.folds}-fold CV x{opts.repeats} (held-out folds)",
            cv["mean"],
            f"fold std {cv['fold_std']:.3f}; features {', '.join(SEARCH_FEATURES)}",
        )
    rerank = RerankSettings()  # as the rerank stage reads them (SLUICE_RERANK_*)
    lambdas: list[float | None] = [None]
    if rerank.diversity_lambda != rerank.search_diversity_lambda:
        lambdas.append(rerank.diversity_lambda)
    for lam in lambdas:
        rankings = in_process_rankings(artifacts, queries, encode, search_diversity_lambda=lam)
        label = (
            f"as deployed (search MMR lambda {rerank.search_diversity_lambda})"
            if lam is None
            else f"with the recommend MMR lambda {lam}"
        )
        add(
            f"whole cascade in process (local stages + Gateway), rerank {label}",
            mean_ndcg(rankings, queries),
            "what MMR diversity would cost search in NDCG@10",
        )
    if opts.served:
        rankings, degraded, seconds = served_on(
            artifacts.root, queries, base / "logs", opts.threads
        )
        served = mean_ndcg(rankings, queries)
        report["served"] = {
            "ndcg10": served,
            "degraded": degraded,
            "seconds": seconds,
            "rankings": rankings,  # per query: for paired comparisons between runs
        }
        add(
            "Sluice served Search (gateway over gRPC, page 10)",
            served,
            f"degraded {degraded}; weights fitted on these queries (in-sample)",
        )
    if opts.served and opts.out_of_fold:
        rankings, degraded, seconds = served_out_of_fold(
            artifacts.root, queries, samples, columns, base, folds=opts.folds, threads=opts.threads
        )
        served = mean_ndcg(rankings, queries)
        report["served_out_of_fold"] = {
            "ndcg10": served,
            "degraded": degraded,
            "seconds": seconds,
            "folds": opts.folds,
            "rankings": rankings,
        }
        if opts.baseline is not None:
            diff = against_baseline(rankings, opts.baseline, queries)
            report["served_out_of_fold"]["against_baseline"] = {
                "baseline": str(opts.baseline),
                **diff,
            }
            print(
                f"served out of fold against {opts.baseline}: {diff['difference']:+.4f} NDCG@10 "
                f"(95% paired-bootstrap interval {diff['low']:+.4f} to {diff['high']:+.4f})",
                flush=True,
            )
        add(
            f"Sluice served Search, out of fold ({opts.folds} folds)",
            served,
            f"degraded {degraded}; each query served by weights fitted without it",
        )
    report["rows"] = [{"name": n, "ndcg10": v, "note": note} for n, v, note in rows]
    (base / "search-report.json").write_text(json.dumps(report, indent=1))
    print(f"\nreport: {base / 'search-report.json'}")
    return report
