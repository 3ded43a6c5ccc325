from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.artifacts import Artifacts
from sluice.coarse.engine import (
    FEATURES,
    CoarseEngine,
    FeatureTables,
    LinearWeights,
    weighted_features,
)
from sluice.domain import Budget, Candidates, FineOverrides, RankContext, StageName
from sluice.fine.backend import CANDIDATES_PER_ROW, TorchBackend
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import COARSE_DECIDES_BETA, FusionWeights
from sluice.recall.engine import RecallEngine


def test_coarse_keeps_the_best_scored(
    engines: dict[StageName, Any], recaller: RecallEngine, tiny_artifacts: Artifacts
) -> None:
    _, histories = tiny_artifacts.users()
    ctx = RankContext(history_item_ids=histories[2])
    cands = recaller.retrieve(ctx, Budget(500))
    ranker: CoarseEngine = engines[StageName.COARSE_RANK]
    kept = ranker.rank(ctx, cands, Budget(100))
    assert len(kept) == 100
    x = ranker.tables.features(ctx, cands)
    assert x.shape == (500, len(FEATURES)) and np.isfinite(x).all()
    full = x @ ranker.weights.recommend
    assert np.isclose(kept.scores.min(), np.sort(full)[-100], rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    needed=st.frozensets(st.sampled_from(FEATURES)),
    user=st.integers(0, 50),
    search=st.booleans(),
    context_item=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_features_computes_only_what_is_needed_and_the_same_values(
    tiny_artifacts: Artifacts,
    needed: frozenset[str],
    user: int,
    search: bool,
    context_item: bool,
    seed: int,
) -> None:
    """What a scorer skips (its zero weights) changes no score: the needed columns hold
    exactly what the full matrix holds, and a skipped feature (not a source flag or the
    recall score, which are always written) stays 0."""
    tables = FeatureTables.from_artifacts(tiny_artifacts)
    catalog = tiny_artifacts.catalog
    _, histories = tiny_artifacts.users()
    rng = np.random.default_rng(seed)
    ids = rng.choice(catalog.item_ids, size=200, replace=False)
    cands = Candidates(ids, rng.random(200).astype(np.float32) / 60, rng.integers(1, 5, 200))
    query = " ".join(catalog.titles[int(rng.integers(len(catalog)))].split()[:3])
    ctx = RankContext(
        history_item_ids=histories[user % len(histories)],
        context_item_id=int(ids[0]) if context_item else 0,
        query=query if search else "",
        query_embedding=(
            tiny_artifacts.text_vectors[int(rng.integers(len(catalog)))] if search else None
        ),
    )
    full = tables.features(ctx, cands)
    some = tables.features(ctx, cands, needed)
    always = {"recall_score", *(n for n in FEATURES if n.startswith("src_"))}
    for j, name in enumerate(FEATURES):
        if name in needed or name in always:
            np.testing.assert_array_equal(some[:, j], full[:, j], err_msg=name)
        else:
            assert not some[:, j].any(), name
    w = np.where([n in needed for n in FEATURES], rng.normal(size=len(FEATURES)), 0).astype(
        np.float32
    )
    assert weighted_features(w) == needed - {n for n, v in zip(FEATURES, w, strict=True) if v == 0}
    np.testing.assert_array_equal(some @ w, full @ w)


def test_coarse_weights_were_fitted(tiny_artifacts: Artifacts) -> None:
    fitted = LinearWeights.load(tiny_artifacts.root / "coarse.json")
    assert not np.allclose(fitted.recommend, LinearWeights.default().recommend)


def test_coarse_feature_behaviour_similarity_follows_history(tiny_artifacts: Artifacts) -> None:
    tables = FeatureTables.from_artifacts(tiny_artifacts)
    catalog = tiny_artifacts.catalog
    item = catalog.item_ids[10]
    ctx = RankContext(history_item_ids=np.array([item]))
    x = tables.features(ctx, Candidates(catalog.item_ids[:50], np.zeros(50), np.zeros(50)))
    assert int(np.argmax(x[:, FEATURES.index("behaviour_sim")])) == 10


def test_fine_stage_pads_and_splits_rows(tiny_artifacts: Artifacts) -> None:
    stage = FineEngine(tiny_artifacts.catalog, TorchBackend(tiny_artifacts.ranker_dir))
    ids = tiny_artifacts.catalog.item_ids[: CANDIDATES_PER_ROW + 44]
    cands = Candidates(ids, np.zeros(len(ids)), np.zeros(len(ids)))
    ctx = RankContext(history_item_ids=ids[:3])
    hist, cand, _, has_q = stage.tensors(ctx, cands)
    assert cand.shape == (2, CANDIDATES_PER_ROW) and hist.shape[0] == 2
    assert (hist[:, -3:] == tiny_artifacts.catalog.rows(ids[:3]) + 1).all() and (
        hist[:, :-3] == 0
    ).all()
    assert not has_q.any()
    ranked = stage.rank(ctx, cands, Budget(len(cands)))
    assert sorted(ranked.item_ids.tolist()) == sorted(ids.tolist())
    assert np.all(np.diff(ranked.scores) <= 0)
    # the score of an item does not depend on which row or company it is scored in
    alone = stage.rank(ctx, cands.take(np.array([290])), Budget(1))
    assert np.isclose(
        alone.scores[0], ranked.scores[ranked.item_ids.tolist().index(ids[290])], atol=1e-4
    )


def test_fine_stage_unknown_items_rank_last(tiny_artifacts: Artifacts) -> None:
    stage = FineEngine(tiny_artifacts.catalog, TorchBackend(tiny_artifacts.ranker_dir))
    ids = np.append(tiny_artifacts.catalog.item_ids[:5], 987654321)
    ranked = stage.rank(
        RankContext(history_item_ids=ids[:1]), Candidates(ids, np.zeros(6), np.zeros(6)), Budget(6)
    )
    assert ranked.item_ids[-1] == 987654321


def test_an_anonymous_request_keeps_recalls_popularity_order(
    engines: dict[StageName, Any], recaller: RecallEngine, tiny_artifacts: Artifacts
) -> None:
    """No query, history or anchor: coarse and fine keep recall's (popularity) order, which
    follows live popularity when the state is shared; with history, the models re-rank."""
    anonymous = RankContext()
    cands = recaller.retrieve(anonymous, Budget(300))
    expected = cands.top(50).item_ids.tolist()
    coarse_engine = engines[StageName.COARSE_RANK]
    coarse = coarse_engine.rank(anonymous, cands, Budget(50))
    assert coarse.item_ids.tolist() == expected
    fine = engines[StageName.FINE_RANK].rank(anonymous, coarse, Budget(20))
    assert fine.item_ids.tolist() == expected[:20]

    _, histories = tiny_artifacts.users()
    known = RankContext(history_item_ids=histories[2])
    assert coarse_engine.rank(known, cands, Budget(50)).item_ids.tolist() != expected


class CountingBackend:
    """The real ranker, counting the calls that reach it."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def score(self, *args: Any, **kwargs: Any) -> np.ndarray:
        self.calls += 1
        return self.backend.score(*args, **kwargs)


def test_the_fine_stage_does_not_run_a_model_that_cannot_change_the_order(
    tiny_artifacts: Artifacts,
) -> None:
    """A build without behaviour fuses with a beta at which the coarse score decides: the
    stage keeps the coarse order (unknown items still last) and never calls the model; a
    fitted beta, or an arm's, runs it."""
    catalog = tiny_artifacts.catalog
    backend = CountingBackend(TorchBackend(tiny_artifacts.ranker_dir))
    decides = FineEngine(catalog, backend, FusionWeights(COARSE_DECIDES_BETA, COARSE_DECIDES_BETA))
    ids = np.append(catalog.item_ids[:40], 987654321)
    scores = np.random.default_rng(0).random(len(ids)).astype(np.float32)
    cands = Candidates(ids, scores, np.zeros(len(ids), np.int8))
    coarse_order = [i for i in cands.top(len(ids)).item_ids.tolist() if i != 987654321]
    search = RankContext(query="red shoes", query_embedding=np.full(384, 384**-0.5, np.float32))
    recommend = RankContext(history_item_ids=catalog.item_ids[50:53])
    flat = Candidates(ids[::-1].copy(), np.ones(len(ids), np.float32), np.zeros(len(ids), np.int8))
    for ctx in (search, recommend):
        ranked = decides.rank(ctx, cands, Budget(len(ids))).item_ids.tolist()
        assert ranked == [*coarse_order, 987654321]
        ties = decides.rank(ctx, flat, Budget(len(ids))).item_ids.tolist()
        assert ties == [*ids[-2::-1].tolist(), 987654321]  # equal scores: the incoming order
        assert not decides.runs_model(ctx)
    assert backend.calls == 0
    arm = RankContext(query="red shoes", fine=FineOverrides(fusion_beta=1.0))
    assert decides.runs_model(arm)
    decides.rank(arm, cands, Budget(10))
    assert backend.calls == 1
    FineEngine(catalog, backend, FusionWeights(1.0, 1.0)).rank(search, cands, Budget(10))
    assert backend.calls == 2
