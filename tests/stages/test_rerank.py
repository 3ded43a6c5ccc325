import numpy as np
import pytest

from sluice.data.catalog import Catalog
from sluice.data.filters import AttributeFilter
from sluice.domain import Budget, Candidates, RankContext
from sluice.rerank.engine import RerankConfig, RerankEngine, title_key


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
