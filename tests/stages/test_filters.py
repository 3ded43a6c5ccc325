import json
from pathlib import Path

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
        colors=["red", "", "blue", "red"],
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


def test_colour_and_its_negation_and_a_saved_catalog_keeps_them(
    catalog: Catalog, tmp_path: Path
) -> None:
    red = compile_filters(catalog, [AttributeFilter("color", any_of=("red",))])
    assert catalog.item_ids[red.mask].tolist() == [10, 13]
    not_red = compile_filters(catalog, [AttributeFilter("color", none_of=("red",))])
    assert catalog.item_ids[not_red.mask].tolist() == [11, 12]  # without a colour: kept
    catalog.save(tmp_path)
    again = Catalog.load(tmp_path)
    assert [again.color_of(r) for r in range(4)] == ["red", "unknown", "blue", "red"]
    assert again.take(np.array([2, 0])).color_of(0) == "blue"


def test_a_catalog_saved_before_colours_loads_without_them(
    catalog: Catalog, tmp_path: Path
) -> None:
    catalog.save(tmp_path)
    arrays = dict(np.load(tmp_path / "catalog.npz"))
    del arrays["color_codes"]
    np.savez(tmp_path / "catalog.npz", **arrays)
    text = json.loads((tmp_path / "catalog_text.json").read_text())
    del text["colors"]
    (tmp_path / "catalog_text.json").write_text(json.dumps(text))
    old = Catalog.load(tmp_path)
    assert old.colors == ["unknown"] and old.color_codes.tolist() == [0, 0, 0, 0]
    fs = compile_filters(old, [AttributeFilter("color", any_of=("red",))])
    assert fs.mask is not None and not fs.mask.any()


def test_colour_filters_on_the_wire_name_their_field() -> None:
    from sluice.common.v1 import common_pb2
    from sluice.convert import item_filters_from_proto, item_filters_to_proto

    wire = [
        common_pb2.ItemFilter(color=common_pb2.StringSet(values=["red"])),
        common_pb2.ItemFilter(not_color=common_pb2.StringSet(values=["blue", "navy"])),
    ]
    filters = item_filters_from_proto(wire)
    assert filters == (
        AttributeFilter("color", any_of=("red",)),
        AttributeFilter("color", none_of=("blue", "navy")),
    )
    assert item_filters_to_proto(filters) == wire
    empty = [common_pb2.ItemFilter(not_color=common_pb2.StringSet())]
    with pytest.raises(InvalidArgument) as err:
        item_filters_from_proto(empty)
    assert err.value.field_path == "item_filters[0].not_color.values"


def test_title_words_keep_items_whose_title_has_them(tmp_path: Path) -> None:
    catalog = Catalog.from_columns(
        item_ids=[1, 2, 3, 4],
        titles=["Trail Running Shoes - Red", "Road Running Shoes", "Trail Mix", "No-Show Socks"],
    )
    fs = compile_filters(catalog, [AttributeFilter("title_words", any_of=("TRAIL",))])
    assert catalog.item_ids[fs.mask].tolist() == [1, 3]
    both = [
        AttributeFilter("title_words", any_of=("trail",)),
        AttributeFilter("title_words", any_of=("running shoes",)),
    ]
    assert catalog.item_ids[compile_filters(catalog, both).mask].tolist() == [1]
    either = [AttributeFilter("title_words", any_of=("mix", "no-show"))]
    assert catalog.item_ids[compile_filters(catalog, either).mask].tolist() == [3, 4]
    nothing = [AttributeFilter("title_words", any_of=("boats",))]
    assert not compile_filters(catalog, nothing).mask.any()
    with pytest.raises(InvalidArgument) as err:
        compile_filters(catalog, [AttributeFilter("title_words", none_of=("trail",))])
    assert err.value.field_path == "filters[0].any_of"


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
