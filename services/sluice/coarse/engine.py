"""Coarse ranking: a linear scorer over features computed for all candidates at once.

Features are cheap, vectorized look-ups against precomputed item tables
(learned item vectors, MiniLM text vectors, BM25, co-occurrence, popularity,
category affinity). Weights are fitted by logistic regression at build time
on recall's own candidates, separately for recommendation and search.

Search also has field-level features besides the document BM25 (title twice
plus description) and the MiniLM similarity to the item text: BM25 against
titles alone and the share of the query's terms found in the title. For a
search-only catalog with judged queries the build fits the search weights on
the judgments over the few ``SEARCH_FEATURES``
(:func:`sluice.eval.search.fit_pairwise`; ``sluice eval search`` reports the
k-fold cross-validation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from sluice.artifacts import Artifacts
from sluice.coarse.fields import TextFields
from sluice.data.catalog import Catalog
from sluice.domain import RRF_K, Budget, Candidates, RankContext, Source
from sluice.kernels import rows_dot, weighted_row_sum
from sluice.recall.lexical import LexicalIndex

FEATURES = (
    "recall_score",
    "src_ann",
    "src_lexical",
    "src_cooc",
    "src_popularity",
    "behaviour_sim",
    "history_text_sim",
    "query_text_sim",
    "bm25",
    "log_popularity",
    "cooc",
    "category_affinity",
    "has_history",
    # search: field-level features
    "bm25_title",
    "title_coverage",
    "title_bigram",
    "description_length",
    # recommendation: co-occurrence on a log scale (its evidence spans orders of magnitude)
    "log_cooc",
)

# What the search weights fitted on judged queries read: a small model on purpose. On
# crowdflower-search, 5-fold CV (forward selection over some 25 candidate features, and
# LightGBM LambdaRank, which cross-validated worse) preferred it (docs/quality.md).
SEARCH_FEATURES = (
    "bm25",
    "query_text_sim",
    "title_coverage",
    "title_bigram",
    "description_length",
)

# ``log_cooc`` = log(1 + LOG_COOC_SCALE * cooc): cosine-normalised co-occurrence weights of a
# history are mostly 1e-3 to 1e-1, so this maps them to about 0.7 to 4.6 and no evidence to 0
LOG_COOC_SCALE = 1000.0

# Column of each feature in the matrix: features are written and weighted by name.
COLUMN = {name: j for j, name in enumerate(FEATURES)}
_ALL = frozenset(FEATURES)
# the features read from the shopper's history, and the search features read from the text
HISTORY_FEATURES = frozenset(
    ("behaviour_sim", "history_text_sim", "cooc", "log_cooc", "category_affinity", "has_history")
)
SEARCH_FIELD_FEATURES = frozenset(
    ("bm25", "bm25_title", "title_coverage", "title_bigram", "description_length")
)
SOURCE_FEATURES = {
    Source.ANN: "src_ann",
    Source.LEXICAL: "src_lexical",
    Source.CO_OCCURRENCE: "src_cooc",
    Source.POPULARITY: "src_popularity",
}


@dataclass
class FeatureTables:
    """Item tables the features read."""

    catalog: Catalog
    behaviour_vectors: np.ndarray
    text_vectors: np.ndarray
    # None in a process that ranks no searches by these features (the fine stage's fusion)
    lexical: LexicalIndex | None
    cooc: sparse.csr_matrix  # [n, n] row -> following items
    popularity: np.ndarray
    history_window: int = 20
    recency_decay: float = 0.85
    text_fields: TextFields | None = None  # built from the catalog on first use

    @property
    def fields(self) -> TextFields:
        """Title term pairs and description lengths (:mod:`sluice.coarse.fields`)."""
        if self.text_fields is None:
            cat = self.catalog
            stem = self.lexical.stem if self.lexical is not None else True
            self.text_fields = TextFields(cat.titles, cat.descriptions or None, stem)
        return self.text_fields

    @classmethod
    def from_artifacts(cls, a: Artifacts, lexical: bool = True) -> FeatureTables:
        """The build's tables; ``lexical=False``: without the BM25 index (no search features)."""
        return cls(
            catalog=a.catalog,
            behaviour_vectors=a.behaviour_vectors,
            text_vectors=a.text_vectors,
            lexical=LexicalIndex.load(a.root / "lexical", a.room) if lexical else None,
            cooc=a.cooc[0],
            popularity=a.popularity,
        )

    def features(
        self, ctx: RankContext, cands: Candidates, needed: frozenset[str] | None = None
    ) -> np.ndarray:
        """Feature matrix [len(cands), len(FEATURES)], float32.

        ``needed``: the features the caller reads (every one when None); the others stay 0
        and are not computed. A scorer passes the features its weights do not zero
        (:func:`weighted_features`), so its scores are the same as with every feature."""
        cat = self.catalog
        rows = cat.rows(cands.item_ids)
        rows = np.where(rows >= 0, rows, 0)
        n = len(rows)
        x = np.zeros((n, len(FEATURES)), dtype=np.float32)
        if n == 0:
            return x
        want = needed if needed is not None else _ALL
        c = COLUMN
        x[:, c["recall_score"]] = cands.scores * RRF_K  # fusion scores are ~1/RRF_K: unit scale
        for src, name in SOURCE_FEATURES.items():
            x[:, c[name]] = cands.sources == src
        hist = np.zeros(0, np.int64)
        if not want.isdisjoint(HISTORY_FEATURES):
            hist = cat.rows(ctx.history_item_ids)
            hist = hist[hist >= 0][-self.history_window :]
            if ctx.context_item_id and cat.row(ctx.context_item_id) >= 0:
                hist = np.array([cat.row(ctx.context_item_id)], dtype=np.int64)
        query_sim = ctx.query_embedding is not None and "query_text_sim" in want
        history_text = len(hist) > 0 and "history_text_sim" in want
        # the text vectors' products with the history and the query in one pass over the
        # candidates' rows (the gather itself was the expensive part, not the product)
        text_vectors: list[np.ndarray] = []
        text_columns: list[int] = []
        if len(hist):
            ages = np.arange(len(hist))[::-1]
            w = (self.recency_decay**ages).astype(np.float32)
            w /= w.sum()
            if "behaviour_sim" in want:
                user = w @ self.behaviour_vectors[hist]
                user /= max(float(np.linalg.norm(user)), 1e-9)
                x[:, c["behaviour_sim"]] = rows_dot(self.behaviour_vectors, rows, user)[:, 0]
            if history_text:
                htext = w @ self.text_vectors[hist]
                htext /= max(float(np.linalg.norm(htext)), 1e-9)
                text_vectors.append(htext)
                text_columns.append(c["history_text_sim"])
            if not want.isdisjoint(("cooc", "log_cooc")):
                cooc = weighted_row_sum(self.cooc, hist, w, rows)
                if "cooc" in want:
                    x[:, c["cooc"]] = cooc
                if "log_cooc" in want:
                    x[:, c["log_cooc"]] = np.log1p(LOG_COOC_SCALE * cooc)
            if "category_affinity" in want:
                hcats = cat.category_codes[hist]
                share = np.bincount(hcats, weights=w, minlength=len(cat.categories))
                x[:, c["category_affinity"]] = share[cat.category_codes[rows]]
            if "has_history" in want:
                x[:, c["has_history"]] = 1.0
        if query_sim and ctx.query_embedding is not None:
            text_vectors.append(ctx.query_embedding)
            text_columns.append(c["query_text_sim"])
        if text_vectors:
            x[:, text_columns] = rows_dot(self.text_vectors, rows, np.stack(text_vectors))
        if ctx.query and self.lexical is not None and not want.isdisjoint(SEARCH_FIELD_FEATURES):
            self._search_features(self.lexical, ctx.query, rows, x, want)
        if "log_popularity" in want:
            x[:, c["log_popularity"]] = np.log1p(self.popularity[rows])
        return x

    def _search_features(
        self,
        lexical: LexicalIndex,
        query: str,
        rows: np.ndarray,
        x: np.ndarray,
        want: frozenset[str],
    ) -> None:
        """BM25 of the document and of the title (each over the query's best match), the
        share of the query's distinct terms found in the title, the share of its adjacent
        term pairs found adjacent in the title and the description's log length (those of
        them in ``want``)."""
        for name, title in (("bm25", False), ("bm25_title", True)):
            if name in want:
                at, top = lexical.scores_at(query, rows, title)
                if top > 0:
                    x[:, COLUMN[name]] = at / top
        terms = sorted(set(lexical.tokens(query))) if "title_coverage" in want else []
        if terms:
            found = np.zeros(len(rows), np.float32)
            for term in terms:
                found += lexical.scores_at(term, rows, title=True)[0] > 0
            x[:, COLUMN["title_coverage"]] = found / len(terms)
        if "title_bigram" in want:
            x[:, COLUMN["title_bigram"]] = self.fields.title_bigram(query, rows)
        if "description_length" in want:
            x[:, COLUMN["description_length"]] = self.fields.description_length(rows)


def weighted_features(weights: np.ndarray) -> frozenset[str]:
    """The features a weight vector over FEATURES reads (its nonzero weights)."""
    return frozenset(name for name, w in zip(FEATURES, weights, strict=True) if w != 0)


def weight_vector(**weights: float) -> np.ndarray:
    """A weight per feature, by name; features not named weigh 0."""
    out = np.zeros(len(FEATURES), np.float32)
    for name, w in weights.items():
        out[COLUMN[name]] = w
    return out


@dataclass
class LinearWeights:
    """One weight vector for recommendation and one for search."""

    recommend: np.ndarray
    search: np.ndarray

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "features": list(FEATURES),
                    "recommend": self.recommend.tolist(),
                    "search": self.search.tolist(),
                },
                indent=1,
            )
        )

    @classmethod
    def load(cls, path: Path) -> LinearWeights:
        """Weights by feature name; features a file predates get weight 0."""
        data = json.loads(path.read_text())
        names = list(data["features"])
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            raise ValueError(f"{path} was trained on features this scorer lacks: {unknown}")

        def by_name(values: list[float]) -> np.ndarray:
            return weight_vector(**dict(zip(names, values, strict=True)))

        return cls(by_name(data["recommend"]), by_name(data["search"]))

    @classmethod
    def default(cls) -> LinearWeights:
        """Hand-set weights used before any training (and in tests)."""
        return cls(
            weight_vector(
                recall_score=1.0,
                behaviour_sim=2.0,
                history_text_sim=1.0,
                cooc=2.0,
                category_affinity=1.0,
            ),
            weight_vector(recall_score=1.0, query_text_sim=3.0, bm25=3.0, log_popularity=0.1),
        )


class CoarseEngine:
    """The coarse stage: scores every candidate with one matrix-vector product, keeps the best."""

    def __init__(self, tables: FeatureTables, weights: LinearWeights) -> None:
        self.tables = tables
        self.weights = weights
        # a feature whose weight is 0 cannot change a score: it is not computed
        self._needed = (weighted_features(weights.search), weighted_features(weights.recommend))

    def rank(self, ctx: RankContext, cands: Candidates, budget: Budget) -> Candidates:
        keep = budget.max_candidates
        if len(cands) == 0:
            return cands
        if ctx.is_anonymous:  # popularity decides; the features hold only build-time counts
            return cands.top(keep)
        search = ctx.is_search
        x = self.tables.features(ctx, cands, self._needed[0 if search else 1])
        w = self.weights.search if search else self.weights.recommend
        return cands.with_scores(x @ w).top(keep)


def fit_weights(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Logistic-regression weights (no intercept: it does not change the order)."""
    from sklearn.linear_model import LogisticRegression

    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("coarse training data needs both positives and negatives")
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=500, random_state=seed)
    model.fit(x, y)
    return np.asarray(model.coef_[0], dtype=np.float32)
