import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.data.filters import AttributeFilter
from sluice.domain import Budget, RankContext, Source
from sluice.embed.text import MiniLMEncoder
from sluice.recall.engine import RecallEngine
from sluice.recall.sources import first_allowed


def test_recommend_merges_sources_within_budget(
    recaller: RecallEngine, tiny_artifacts: Artifacts
) -> None:
    _, histories = tiny_artifacts.users()
    hist = histories[0]
    c = recaller.retrieve(RankContext(history_item_ids=hist, exclude_item_ids=hist), Budget(300))
    assert len(c) == 300
    assert len(np.unique(c.item_ids)) == 300
    assert not np.isin(c.item_ids, hist).any()
    assert set(np.unique(c.sources)) >= {Source.ANN, Source.CO_OCCURRENCE, Source.POPULARITY}
    assert np.all(np.diff(c.scores) <= 0), "merged list is not ordered by fused score"


def test_cold_start_is_popularity(recaller: RecallEngine, tiny_artifacts: Artifacts) -> None:
    c = recaller.retrieve(RankContext(), Budget(50))
    assert set(c.sources.tolist()) == {int(Source.POPULARITY)}
    rows = tiny_artifacts.catalog.rows(c.item_ids)
    pop = tiny_artifacts.popularity
    assert pop[rows].min() >= np.sort(pop)[-50]


def test_filters_never_shrink_the_budget(recaller: RecallEngine, tiny_artifacts: Artifacts) -> None:
    catalog = tiny_artifacts.catalog
    category = catalog.categories[0]
    in_category = int((catalog.category_codes == 0).sum())
    _, histories = tiny_artifacts.users()
    ctx = RankContext(
        history_item_ids=histories[1], filters=(AttributeFilter("category", any_of=(category,)),)
    )
    c = recaller.retrieve(ctx, Budget(1000))
    assert len(c) == in_category  # every allowed item, none other
    assert all(catalog.category_of(r) == category for r in catalog.rows(c.item_ids))


def test_search_uses_lexical_and_ann(
    recaller: RecallEngine, tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    title = tiny_artifacts.catalog.titles[5]
    q = " ".join(title.split()[1:4])
    ctx = RankContext(query=q, query_embedding=encoder.encode([q])[0])
    c = recaller.retrieve(ctx, Budget(200))
    assert {Source.LEXICAL, Source.ANN} <= set(c.sources.tolist())
    assert tiny_artifacts.catalog.item_ids[5] in c.item_ids[:50]


@pytest.mark.parametrize("budget", [1, 10, 77])
def test_exact_budget(recaller: RecallEngine, budget: int) -> None:
    assert len(recaller.retrieve(RankContext(), Budget(budget))) == budget


@pytest.mark.parametrize("keep_share", [1.0, 0.999, 0.5, 0.01, 0.0])
def test_first_allowed_matches_filtering_the_whole_order(keep_share: float) -> None:
    rng = np.random.default_rng(7)
    order = rng.permutation(5000)
    allowed = rng.random(5000) < keep_share
    for k in (1, 10, 1000, 6000):
        expected = order[allowed[order]][:k]
        np.testing.assert_array_equal(first_allowed(order, k, allowed), expected)
    np.testing.assert_array_equal(first_allowed(order, 10, None), order[:10])


def test_lexical_reads_from_postings_agree_with_every_rows_scores(tmp_path) -> None:
    """``scores_at`` and ``search`` read only the query terms' postings, live items'
    documents included; they must give what the whole score array gives, to the bit."""
    from pathlib import Path

    from sluice.recall.lexical import LexicalIndex

    titles = ["red wool scarf", "blue wool hat", "red cotton shirt", "green scarf", "hat"]
    descs = ["warm red scarf", "", "a shirt, red", "scarf scarf", "wool"]
    LexicalIndex.build(titles, descs).save(Path(tmp_path))
    index = LexicalIndex.load(Path(tmp_path), room=3)
    index.add_rows([5, 6], ["red wool gloves", "scarf"], ["gloves", "red"], lambda: (titles, descs))
    rng = np.random.default_rng(3)
    rows = rng.integers(0, index.capacity, 40)
    queries = ["red scarf", "wool wool hat", "gloves", "nothing here", "", "scarves red hat"]
    for query in queries:
        for title, full in ((False, index.scores(query)), (True, index.title_scores(query))):
            at, top = index.scores_at(query, rows, title)
            np.testing.assert_array_equal(at, full[rows])
            assert top == max(0.0, float(full.max()))
        full = index.scores(query)
        for mask in (None, rng.random(index.capacity) < 0.6):
            seen = full if mask is None else np.where(mask, full, 0)
            expected = sorted(np.nonzero(seen > 0)[0].tolist(), key=lambda r: (-seen[r], r))
            for k in (1, 3, 100):
                found, scores = index.search(query, k, mask)
                assert found.tolist() == expected[:k]
                np.testing.assert_array_equal(scores, full[found])
    # the live row is found, and the build's statistics count it
    assert 5 in index.search("gloves", 3)[0].tolist()
