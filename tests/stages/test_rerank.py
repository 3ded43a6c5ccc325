from collections.abc import Callable

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.data.filters import AttributeFilter
from sluice.domain import Budget, Candidates, RankContext, RerankOverrides
from sluice.rerank.engine import RerankConfig, RerankEngine, title_key
from sluice.rerank.exposure import fair_minimums


def make(n: int = 12, titles: list[str] | None = None) -> tuple[Catalog, np.ndarray]:
    brands = ["b0"] * 6 + ["b1"] * 3 + ["b2"] * (n - 9)
    catalog = Catalog.from_columns(
        item_ids=list(range(100, 100 + n)),
        titles=titles or [f"Item {i} - Red" for i in range(n)],
        categories=["c"] * n,
        brands=brands,
        in_stock=[i != 3 for i in range(n)],
    )
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs[1] = vecs[0]  # items 100 and 101 are identical in embedding space
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return catalog, vecs


def cands(ids: list[int]) -> Candidates:
    scores = np.linspace(1.0, 0.1, len(ids))
    return Candidates(np.array(ids), scores, np.zeros(len(ids)))


def test_relevance_only_keeps_order_and_drops_out_of_stock() -> None:
    catalog, vecs = make()
    rr = RerankEngine(catalog, vecs, RerankConfig(diversity_lambda=1.0, max_per_brand=0))
    ordered = rr.rank(RankContext(), cands(list(range(100, 112))), Budget(5))
    assert ordered.item_ids[:5].tolist() == [100, 101, 102, 104, 105]
    assert len(ordered) == 11  # every eligible item: the total across pages


def test_mmr_pushes_down_a_near_duplicate_embedding() -> None:
    catalog, vecs = make()
    rr = RerankEngine(catalog, vecs, RerankConfig(diversity_lambda=0.5, max_per_brand=0))
    ids = rr.rank(RankContext(), cands(list(range(100, 112))), Budget(4)).item_ids[:4].tolist()
    assert ids[0] == 100 and 101 not in ids


def test_search_requests_use_the_search_lambda_and_arms_set_the_recommend_one() -> None:
    catalog, vecs = make()
    config = RerankConfig(diversity_lambda=0.5, max_per_brand=0, search_diversity_lambda=1.0)
    rr = RerankEngine(catalog, vecs, config)
    plain = RerankEngine(catalog, vecs, RerankConfig(0.5, 0, search_diversity_lambda=None))

    def top4(engine: RerankEngine, ctx: RankContext) -> list[int]:
        return engine.rank(ctx, cands(list(range(100, 112))), Budget(4)).item_ids[:4].tolist()

    search = RankContext(query="red item")
    assert top4(rr, search) == [100, 101, 102, 104]  # relevance order (103 is out of stock)
    assert 101 not in top4(rr, RankContext())  # recommendation: MMR at 0.5
    arm = RerankOverrides(diversity_lambda=0.3)  # a recommendation experiment's lambda
    assert 101 not in top4(rr, RankContext(rerank=arm))
    assert top4(rr, RankContext(query="red item", rerank=arm)) == [100, 101, 102, 104]
    capped = RankContext(query="red item", rerank=RerankOverrides(max_per_brand=1))
    assert top4(rr, capped) == [100, 106, 109, 101]  # the arm's cap, still no MMR
    assert 101 not in top4(plain, search)  # no search lambda: the recommendation one


def test_brand_cap_and_dedupe_by_title_and_id() -> None:
    titles = [f"Item {i} - Red" for i in range(12)]
    titles[5] = "Item 4 - Blue"  # the same product as item 104 in another variant
    catalog, vecs = make(titles=titles)
    rr = RerankEngine(catalog, vecs, RerankConfig(diversity_lambda=1.0, max_per_brand=2))
    ordered = rr.rank(
        RankContext(), cands([100, 100, 101, 102, 104, 105, 106, 107, 108]), Budget(4)
    )
    ids = ordered.item_ids[:4].tolist()
    assert ids.count(100) == 1 and 105 not in ids
    assert ids[:3] == [100, 101, 106]  # b0 is capped at two, so b1's best comes next


def test_pages_do_not_overlap_and_respect_filters() -> None:
    catalog, vecs = make()
    rr = RerankEngine(catalog, vecs, RerankConfig(diversity_lambda=0.7))
    ctx = RankContext(
        filters=(AttributeFilter("brand", any_of=("b0", "b2")),), exclude_item_ids=np.array([102])
    )
    full = cands(list(range(100, 112)))
    p1 = rr.rank(ctx, full, Budget(3)).window(0, 3).item_ids.tolist()
    p2 = rr.rank(ctx, full, Budget(3, offset=3)).window(3, 3).item_ids.tolist()
    assert not set(p1) & set(p2)
    assert all(catalog.brand_of(catalog.row(i)) in ("b0", "b2") for i in p1 + p2)
    assert 102 not in p1 + p2


@pytest.mark.parametrize(
    ("title", "key"), [("Acme Pro Shoe - Blue", "acme pro shoe"), ("Plain  Title", "plain title")]
)
def test_title_key(title: str, key: str) -> None:
    assert title_key(title) == key


def tail_prefixes(ids: list[int], tail: np.ndarray) -> np.ndarray:
    """The number of tail items in each prefix of ``ids`` (items 100 + row)."""
    return np.cumsum([bool(tail[i - 100]) for i in ids])


@pytest.mark.parametrize("share", [0.3, 0.5, 0.8])
def test_an_exposure_target_holds_every_prefix_to_the_fair_minimum(share: float) -> None:
    catalog, vecs = make(30 + 9, [f"Item {i}" for i in range(39)])
    tail = np.zeros(len(catalog), dtype=bool)
    tail[np.arange(20, 39)] = True  # the least relevant half is the long tail
    ids = list(range(100, 139))
    plain = RerankEngine(catalog, vecs, RerankConfig(diversity_lambda=1.0, max_per_brand=0))
    fair = RerankEngine(
        catalog,
        vecs,
        RerankConfig(diversity_lambda=1.0, max_per_brand=0, tail_share=share, tail_alpha=0.1),
        tail,
    )
    before = plain.rank(RankContext(), cands(ids), Budget(20)).item_ids[:20].tolist()
    after = fair.rank(RankContext(), cands(ids), Budget(20)).item_ids[:20].tolist()
    minimums = fair_minimums(20, share, 0.1)
    assert (tail_prefixes(before, tail) < minimums[1:]).any()  # relevance alone falls short
    assert (tail_prefixes(after, tail) >= minimums[1:]).all()
    # the rest keeps relevance order: head items in their order, tail items in theirs
    head_after = [i for i in after if not tail[i - 100]]
    assert head_after == sorted(head_after)
    assert sorted(after) != after  # and the page did change
    assert 103 not in after  # out of stock stays out


def test_an_exposure_target_takes_what_the_tail_has() -> None:
    catalog, vecs = make()
    tail = np.zeros(len(catalog), dtype=bool)
    tail[[10, 11]] = True  # only two tail items among twelve
    fair = RerankEngine(
        catalog, vecs, RerankConfig(diversity_lambda=1.0, max_per_brand=0, tail_share=1.0), tail
    )
    ids = fair.rank(RankContext(), cands(list(range(100, 112))), Budget(6)).item_ids.tolist()
    assert ids[:2] == [110, 111] and ids[2:6] == [100, 101, 102, 104]
    assert len(ids) == 11


def test_an_exposure_target_needs_the_tail() -> None:
    catalog, vecs = make()
    with pytest.raises(ValueError, match="tail"):
        RerankEngine(catalog, vecs, RerankConfig(tail_share=0.5))


def test_the_loader_takes_both_lambdas_from_the_settings(tiny_artifacts: Artifacts) -> None:
    from sluice.config import RerankSettings
    from sluice.rerank.loader import load

    closers: list[Callable[[], None]] = []
    settings = RerankSettings(
        artifacts=tiny_artifacts.root, diversity_lambda=0.7, search_diversity_lambda=0.3
    )
    try:
        config = load(settings, closers).config
    finally:
        for close in closers:
            close()
    assert (config.diversity_lambda, config.search_diversity_lambda) == (0.7, 0.3)
