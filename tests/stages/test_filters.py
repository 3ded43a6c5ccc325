import numpy as np
import pytest

from sluice.core.errors import InvalidArgument
from sluice.data.catalog import Catalog
from sluice.data.filters import AttributeFilter, compile_filters


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.from_columns(
        item_ids=[10, 11, 12, 13],
        titles=["a", "b", "c", "d"],
        categories=["shoes", "socks", "shoes", "hats"],
        brands=["acme", "acme", "zed", "zed"],
        price_cents=[1000, 500, 2500, 4000],
        in_stock=[True, True, False, True],
    )


def test_filters_combine_with_and(catalog: Catalog) -> None:
    fs = compile_filters(
        catalog,
        [
            AttributeFilter("category", any_of=("shoes", "hats")),
            AttributeFilter("price_cents", min=900, max=3000),
        ],
    )
    assert fs.mask is not None
    assert catalog.item_ids[fs.mask].tolist() == [10, 12]


def test_in_stock_and_brand(catalog: Catalog) -> None:
    fs = compile_filters(
        catalog,
        [AttributeFilter("in_stock", equals=True), AttributeFilter("brand", any_of=("zed",))],
    )
    assert catalog.item_ids[fs.mask].tolist() == [13]


def test_unknown_value_matches_nothing(catalog: Catalog) -> None:
    fs = compile_filters(catalog, [AttributeFilter("category", any_of=("boats",))])
    assert fs.mask is not None and not fs.mask.any()


@pytest.mark.parametrize(
    ("flt", "field"),
    [
        (AttributeFilter("colour", any_of=("red",)), "filters[0].field"),
        (AttributeFilter("category"), "filters[0].any_of"),
        (AttributeFilter("price_cents"), "filters[0].min"),
        (AttributeFilter("price_cents", min=5, max=1), "filters[0].min"),
        (AttributeFilter("in_stock"), "filters[0].equals"),
    ],
)
def test_bad_filters_name_the_field(catalog: Catalog, flt: AttributeFilter, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        compile_filters(catalog, [flt])
    assert err.value.field_path == field


def test_allows_rows_handles_unknown_rows(catalog: Catalog) -> None:
    fs = compile_filters(catalog, [AttributeFilter("brand", any_of=("acme",))])
    assert fs.allows_rows(np.array([0, -1, 2])).tolist() == [True, False, False]
