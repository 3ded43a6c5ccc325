"""The merchant's rules file, its per-request compilation, boosts and pins (pure parts)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sluice.common.v1 import common_pb2
from sluice.convert import context_from_proto, context_to_proto
from sluice.core.errors import InvalidArgument
from sluice.data.catalog import Catalog
from sluice.data.filters import AttributeFilter, compile_filters
from sluice.domain import Boost, Candidates, Pin, RankContext, RequestKind, Surface
from sluice.rules import (
    RELOADS,
    RulesError,
    RuleSet,
    RulesFile,
    RulesWatcher,
    apply_boosts,
    place_pins,
    read_rules,
    write_rules,
)

BRANDS = ["acme", "acme", "bolt", "bolt", "corp", "corp", "acme", "bolt"]
CATEGORIES = ["toys", "wine", "toys", "wine", "books", "toys", "books", "books"]


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.from_columns(
        item_ids=[10, 11, 12, 13, 14, 15, 16, 17],
        titles=[f"item {i}" for i in range(8)],
        categories=CATEGORIES,
        brands=BRANDS,
        in_stock=[True] * 8,
    )


def rules(**spec: object) -> RuleSet:
    return RuleSet(RulesFile.model_validate({"version": "v1", **spec}))


def ids_of(catalog: Catalog, mask: np.ndarray) -> list[int]:
    return catalog.item_ids[mask].tolist()


# -- the file -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"boosts": [{"brand": "acme", "weight": 1.5}]}, "boosts.0.weight"),
        ({"boosts": [{"brand": "acme", "item_id": 3, "weight": 0.1}]}, "boosts.0"),
        ({"boosts": [{"weight": 0.1}]}, "boosts.0"),
        ({"pins": [{"item_id": 1, "position": 0}]}, "pins.0.position"),
        ({"pins": [{"item_id": 1, "position": 1, "surfaces": ["checkout"]}]}, "pins.0.surfaces.0"),
        ({"blocked": {"brand": ["acme"]}}, "blocked.brand"),
        ({"queries": {"blocked": ["   "]}}, "queries.blocked.0"),
        ({"pins": [{"item_id": i, "position": 1} for i in range(101)]}, "(the file)"),
        (
            {
                "blocked": {"categories": [f"c{i}" for i in range(200)]},
                "age_restricted_categories": [f"a{i}" for i in range(57)],
            },
            "(the file)",
        ),
    ],
)
def test_a_bad_rules_file_is_refused_naming_the_field(
    tmp_path: Path, spec: dict[str, object], where: str
) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"version": "v1", **spec}))
    with pytest.raises(RulesError, match=rf"rules file .*: {re.escape(where)}: "):
        read_rules(path)


def test_a_version_is_required_and_printable(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    for body in ("{}", '{"version": "two words"}', "not json"):
        path.write_text(body)
        with pytest.raises(RulesError):
            read_rules(path)


# -- queries ---------------------------------------------------------------------------------
def test_blocked_phrases_match_whole_words_in_any_case() -> None:
    rs = rules(queries={"blocked": ["fake id"]})
    assert rs.query("Fake ID card").blocked
    assert rs.query("buy a fake   id!").blocked
    assert not rs.query("fakeid card").blocked
    assert not rs.query("id fake").blocked
    decision = rs.query("Red Shoes")
    assert not decision.blocked and decision.query == "Red Shoes"  # untouched when no rule


def test_rewrites_change_what_is_searched_and_cannot_dodge_a_block() -> None:
    rs = rules(queries={"blocked": ["knife"], "rewrites": {"tshirt": "t shirt", "blade": "knife"}})
    assert rs.query("Blue TShirt").query == "blue t shirt"
    assert rs.query("a blade set").blocked


# -- one request ------------------------------------------------------------------------------
def test_blocks_apply_per_surface_and_age_restriction_needs_the_flag(catalog: Catalog) -> None:
    rs = rules(
        blocked={"item_ids": [15], "brands": ["corp"]},
        surfaces={"similar_items": {"brands": ["bolt"]}},
        age_restricted_categories=["wine"],
    )
    home = rs.for_request(catalog, RequestKind.RECOMMEND, Surface.HOME)
    similar = rs.for_request(catalog, RequestKind.RECOMMEND, Surface.SIMILAR_ITEMS)
    adult = rs.for_request(catalog, RequestKind.SEARCH, Surface.UNSPECIFIED, "x", True)
    assert ids_of(catalog, ~home.allowed(catalog, catalog.item_ids)) == [11, 13, 14, 15]
    assert ids_of(catalog, ~similar.allowed(catalog, catalog.item_ids)) == [
        11,
        12,
        13,
        14,
        15,
        17,
    ]
    assert ids_of(catalog, ~adult.allowed(catalog, catalog.item_ids)) == [14, 15]
    # what the stages get: filters and exclusions that block the same rows
    for rr in (home, similar, adult):
        mask = compile_filters(catalog, rr.filters).mask
        assert mask is not None
        mask = mask & ~np.isin(catalog.item_ids, rr.exclude_item_ids)
        assert (mask == rr.allowed(catalog, catalog.item_ids)).all()
    assert home.allowed(catalog, np.array([999])).tolist() == [False]  # unknown ids never pass


def test_pins_follow_surface_and_query_and_boosts_their_surfaces(catalog: Catalog) -> None:
    rs = rules(
        pins=[
            {"item_id": 12, "position": 1, "surfaces": ["home"]},
            {"item_id": 16, "position": 2, "surfaces": ["search"], "queries": ["Board Games"]},
        ],
        boosts=[{"brand": "bolt", "weight": 0.5, "surfaces": ["search"]}],
    )
    home = rs.for_request(catalog, RequestKind.RECOMMEND, Surface.HOME)
    hit = rs.for_request(catalog, RequestKind.SEARCH, Surface.UNSPECIFIED, "board games")
    miss = rs.for_request(catalog, RequestKind.SEARCH, Surface.UNSPECIFIED, "board games sale")
    assert home.pins == (Pin(12, 1),) and home.boosts == ()
    assert hit.pins == (Pin(16, 2),) and hit.boosts == (Boost(0.5, brand="bolt"),)
    assert miss.pins == ()
    assert home.blocked_rows is None  # nothing blocked: the gateway's guard has nothing to do


# -- boosts and pins ------------------------------------------------------------------------
def test_boosts_reorder_by_scaled_relevance(catalog: Catalog) -> None:
    cands = Candidates(np.array([10, 12, 14, 16]), np.array([4.0, 3.0, 2.0, 1.0]), np.ones(4))
    out = apply_boosts(catalog, cands, [Boost(0.5, brand="corp"), Boost(-1.0, item_id=10)])
    # scaled: 1, 2/3, 1/3, 0; corp (14) +0.5 -> 0.83; item 10 -> 0
    assert out.item_ids.tolist() == [14, 12, 10, 16]
    assert math.isclose(float(out.scores[0]), 1 / 3 + 0.5, rel_tol=1e-6)
    assert apply_boosts(catalog, cands, []) is cands
    # item 0 is an item like any other, not "no item": it boosts that item alone
    with_zero = Catalog.from_columns(
        item_ids=[0, 1, 2], titles=["a", "b", "c"], categories=["", "", "x"], brands=["p"] * 3
    )
    zero = Candidates(np.array([2, 1, 0]), np.array([3.0, 2.0, 1.0]), np.ones(3))
    # scaled 1, 0.5, 0; item 0 gets +1 and ties item 2 (kept first); item 1 shares item 0's
    # empty category and gets nothing
    assert apply_boosts(with_zero, zero, [Boost(1.0, item_id=0)]).item_ids.tolist() == [2, 0, 1]


def test_pins_move_or_insert_items_and_skip_what_may_not_show() -> None:
    cands = Candidates(np.arange(100, 110), np.linspace(1, 0.1, 10), np.full(10, 1, np.int8))
    allowed = {200}

    def allows(ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, list(allowed))

    out = place_pins(cands, [Pin(105, 1), Pin(200, 3), Pin(300, 2), Pin(101, 50)], allows)
    assert out.item_ids.tolist() == [105, 100, 200, 102, 103, 104, 106, 107, 108, 109, 101]
    assert len(set(out.item_ids.tolist())) == len(out)  # a pinned item appears once
    assert out.sources.tolist()[:3] == [1, 1, 0]  # an inserted item was not recalled
    assert float(out.scores[2]) == pytest.approx(float(cands.scores[2]))  # 102's, displaced


# -- the wire ---------------------------------------------------------------------------------
def test_pins_boosts_and_negated_filters_cross_the_wire() -> None:
    ctx = RankContext(
        kind=RequestKind.RECOMMEND,
        filters=(
            AttributeFilter("brand", none_of=("x", "y")),
            AttributeFilter("category", any_of=("c",)),
        ),
        pins=(Pin(5, 1), Pin(6, 10_100)),
        boosts=(Boost(0.25, brand="b"), Boost(-1.0, item_id=9), Boost(1.0, category="c")),
    )
    back = context_from_proto(context_to_proto(ctx))
    assert back.filters == ctx.filters and back.pins == ctx.pins and back.boosts == ctx.boosts


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda m: m.pins.add(item_id=1, position=0), "context.pins[0].position"),
        (lambda m: m.pins.add(item_id=1, position=10_101), "context.pins[0].position"),
        (lambda m: m.boosts.add(brand="b", weight=float("nan")), "context.boosts[0].weight"),
        (lambda m: m.boosts.add(brand="b", weight=1.01), "context.boosts[0].weight"),
        (lambda m: m.boosts.add(weight=0.1), "context.boosts[0]"),
        (lambda m: m.boosts.add(brand="b" * 257, weight=0.1), "context.boosts[0].brand"),
        (
            lambda m: m.filters.add(not_brand=common_pb2.StringSet()),
            "context.filters[0].not_brand.values",
        ),
        (lambda m: [m.pins.add(item_id=i, position=1) for i in range(101)], "context.pins"),
    ],
)
def test_bad_pins_boosts_and_filters_are_invalid_argument_naming_the_field(
    mutate: object, where: str
) -> None:
    msg = common_pb2.RankContext()
    mutate(msg)  # type: ignore[operator]
    with pytest.raises(InvalidArgument) as err:
        context_from_proto(msg)
    assert err.value.field_path == where


# -- the watcher ----------------------------------------------------------------------------
def test_the_watcher_swaps_in_a_changed_file_and_keeps_the_rules_on_a_bad_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rules.json"
    write_rules(path, {"version": "one", "blocked": {"brands": ["acme"]}})
    watcher = RulesWatcher(path)
    assert watcher.current.version == "one" and not watcher.check()  # unchanged: no reload
    write_rules(path, {"version": "two", "blocked": {"brands": ["bolt"]}})
    assert watcher.check() and watcher.current.version == "two"
    errors = RELOADS.labels("error")._value.get()
    path.write_text('{"version": "three", "blocked": {"brands": "not a list"}}')
    assert not watcher.check()
    assert watcher.current.version == "two"  # the rules in force stay
    assert RELOADS.labels("error")._value.get() == errors + 1
    assert not watcher.check()  # a bad file is reported once
    with pytest.raises(RulesError):  # at start, a bad file stops the gateway
        RulesWatcher(path)
