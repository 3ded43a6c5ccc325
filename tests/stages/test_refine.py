"""Conversational refinement: the parser on the tiny shop with the real MiniLM encoder, and
sessions through the gateway and the real stages in process."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.core.errors import InvalidArgument
from sluice.data.catalog import UNKNOWN, Catalog
from sluice.data.filters import AttributeFilter, validate
from sluice.domain import StageName
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.pipeline import Gateway, QueryEncoder
from sluice.gateway.refine import Refiner, Sessions, SessionState, check_session_id
from sluice.gateway.stages import LocalStage
from sluice.gateway.users import UserHistory, item_attributes
from sluice.state.store import InMemoryStateStore


@pytest.fixture(scope="module")
def query_encoder(encoder: MiniLMEncoder) -> QueryEncoder:
    return QueryEncoder(encoder.encode)


@pytest.fixture(scope="module")
def refiner(tiny_artifacts: Artifacts, query_encoder: QueryEncoder) -> Refiner:
    return Refiner.from_artifacts(tiny_artifacts, query_encoder)


@pytest.fixture
def store(tiny_artifacts: Artifacts) -> InMemoryStateStore:
    return InMemoryStateStore(item_attributes(tiny_artifacts.catalog))


@pytest.fixture
def gateway(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    query_encoder: QueryEncoder,
    refiner: Refiner,
    store: InMemoryStateStore,
) -> Gateway:
    return Gateway(
        local_stages,
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, store),
        query_encoder,
        sessions=Sessions(refiner, store),
    )


def _page_of(catalog: Catalog, category: str, n: int = 10) -> list[int]:
    rows = [r for r in range(len(catalog)) if catalog.category_of(r) == category][:n]
    return [int(catalog.item_ids[r]) for r in rows]


def _state(catalog: Catalog, query: str, category: str) -> SessionState:
    return SessionState(text=query, query=query, page_item_ids=_page_of(catalog, category), turn=1)


def _common(catalog: Catalog) -> tuple[str, str, str]:
    """The tiny shop's commonest category, brand and colour."""
    cat = Counter(catalog.category_of(r) for r in range(len(catalog))).most_common(1)[0][0]
    brand = Counter(catalog.brand_of(r) for r in range(len(catalog))).most_common(1)[0][0]
    colors = Counter(catalog.color_of(r) for r in range(len(catalog)))
    color = next(c for c, _ in colors.most_common() if c != UNKNOWN)
    return cat, brand, color


# -- the parser -------------------------------------------------------------------------------


def test_a_first_turn_takes_its_constraints_out_of_the_query(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    _, brand, color = _common(tiny_artifacts.catalog)
    turn = refiner.refine(f"{color} running shoes under 50 dollars not {brand}", None)
    assert turn.query == "running shoes" and turn.turn == 1
    c = turn.constraints
    assert c.color == color and c.price_max_cents == 4999 and c.not_brands == [brand]
    assert turn.anchor_item_id == 0 and turn.query_embedding is None


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("under 20 dollars", lambda c: c.price_max_cents == 1999 and c.price_min_cents is None),
        ("no more than $35.50", lambda c: c.price_max_cents == 3550),
        (
            "between 10 and 20 bucks",
            lambda c: (c.price_min_cents, c.price_max_cents) == (1000, 2000),
        ),
        ("over 100 dollars", lambda c: c.price_min_cents == 10001),
        ("in stock only", lambda c: c.in_stock),
    ],
)
def test_price_and_stock_follow_ups(
    refiner: Refiner, tiny_artifacts: Artifacts, text: str, check: Any
) -> None:
    cat, _, _ = _common(tiny_artifacts.catalog)
    turn = refiner.refine(text, _state(tiny_artifacts.catalog, cat, cat))
    assert check(turn.constraints), (text, turn.constraints)
    assert turn.query == cat  # the topic is kept
    assert turn.turn == 2


def test_a_bound_that_contradicts_the_session_s_replaces_it(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    """A later bound on the other side of an earlier one would ask for min > max, which no
    filter may hold (the search would fail): the later bound wins."""
    cat, _, _ = _common(tiny_artifacts.catalog)
    state = _state(tiny_artifacts.catalog, cat, cat)
    under = refiner.refine("under 20 dollars", state)
    state.constraints = under.constraints
    over = refiner.refine("over 50 dollars", state)
    assert (over.constraints.price_min_cents, over.constraints.price_max_cents) == (5001, None)
    validate(over.filters)  # a filter the gateway and every stage accept
    state.constraints = over.constraints
    again = refiner.refine("no more than 30 dollars", state)
    assert (again.constraints.price_min_cents, again.constraints.price_max_cents) == (None, 3000)
    huge = refiner.refine("under " + "9" * 400 + " dollars", state)  # no overflow, a bound
    assert huge.constraints.price_max_cents is not None
    validate(huge.filters)


def test_cheaper_is_below_the_median_price_of_the_last_page(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    cat, _, _ = _common(catalog)
    state = _state(catalog, cat, cat)
    median = int(np.median(catalog.price_cents[catalog.rows(state.page_item_ids)]))
    for text in ("cheaper", "show me something less expensive"):
        assert refiner.refine(text, state).constraints.price_max_cents == median - 1
    assert refiner.refine("pricier", state).constraints.price_min_cents == median + 1


def test_colours_brands_and_their_negations(refiner: Refiner, tiny_artifacts: Artifacts) -> None:
    catalog = tiny_artifacts.catalog
    cat, brand, color = _common(catalog)
    state = _state(catalog, cat, cat)
    red = refiner.refine(f"in {color}", state)
    assert red.constraints.color == color and red.query == cat
    state2 = red.state(f"in {color}", state.page_item_ids, cat)
    # a new colour replaces the old one; a negated one is excluded
    other = next(c for c in catalog.colors if c not in (UNKNOWN, color))
    assert refiner.refine(f"{other} ones", state2).constraints.color == other
    not_it = refiner.refine(f"not {color}", state2).constraints
    assert not_it.color == "" and not_it.not_colors == [color]
    # brands: excluded by negation (case and spacing as typed), chosen by "only"/"from"
    assert refiner.refine(f"without {brand.upper()}", state2).constraints.not_brands == [brand]
    assert refiner.refine(f"only {brand}", state2).constraints.brand == brand
    # a misspelt brand after a negation is still the brand
    typo = brand[:-1] + ("x" if brand[-1] != "x" else "y")
    if len(brand) >= 5:
        assert refiner.refine(f"no {typo}", state2).constraints.not_brands == [brand]


def test_a_colour_the_catalog_does_not_name_goes_to_its_nearest(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    if "red" not in catalog.colors:
        pytest.skip("the tiny shop has no red items")
    cat, _, _ = _common(catalog)
    turn = refiner.refine("crimson", _state(catalog, cat, cat))
    assert turn.constraints.color == "red", turn.applied


def test_more_like_an_item_of_the_last_page_anchors_the_query(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    cat, _, _ = _common(catalog)
    state = _state(catalog, cat, cat)
    for text, position in (
        ("more like the second one", 1),
        ("like #3", 2),
        ("similar to the last", len(state.page_item_ids) - 1),
    ):
        turn = refiner.refine(text, state)
        assert turn.anchor_item_id == state.page_item_ids[position], text
        assert turn.query == cat and turn.query_embedding is not None
        anchor = tiny_artifacts.text_vectors[catalog.row(turn.anchor_item_id)]
        assert float(turn.query_embedding @ anchor) > float(refiner.encode(cat) @ anchor)
    # a position the last page does not have anchors nothing
    assert refiner.refine("like #99", state).anchor_item_id == 0


def test_free_words_add_to_the_query_and_another_product_starts_over(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    _, brand, _ = _common(catalog)
    state = SessionState(text="running shoes", query="running shoes", turn=1)
    state.constraints.not_brands = [brand]
    added = refiner.refine("lightweight", state)
    assert added.query == "running shoes lightweight" and added.constraints.not_brands == [brand]
    switched = refiner.refine("espresso machine", state)
    assert switched.query == "espresso machine" and switched.constraints.not_brands == []
    assert switched.applied[0] == "new topic"
    again = refiner.refine("start over: headphones", state)
    assert again.query == "headphones" and again.turn == 1 and again.constraints.not_brands == []


def test_a_word_that_many_titles_of_the_topic_have_narrows_the_result(
    refiner: Refiner, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    cat, _, _ = _common(catalog)
    rows = [r for r in range(len(catalog)) if catalog.category_of(r) == cat]
    words = Counter(w for r in rows for w in set(catalog.titles[r].lower().split()))
    common = next(
        w for w, n in words.most_common() if n >= 10 and w.isalpha() and w not in cat.split()
    )
    state = _state(catalog, cat, cat)
    state.topic = cat
    turn = refiner.refine(common, state)
    assert turn.constraints.title_words == [common] and turn.query == f"{cat} {common}"
    assert turn.boosts and turn.boosts[0].category == cat  # later turns keep to the topic
    assert AttributeFilter("category", any_of=(cat,)) in turn.filters  # and within it
    # a word no title has cannot match an item: it leaves the query as it was, instead of
    # pulling its meaning off the topic
    rare = refiner.refine("zyzzyva preferably", state)
    assert rare.constraints.title_words == [] and rare.query == cat


def test_session_state_round_trips_and_a_broken_one_starts_over(refiner: Refiner) -> None:
    state = refiner.refine("blue running shoes under 80 dollars", None).state(
        "t", [1, 2, 3], "shoes"
    )
    assert SessionState.from_json(state.to_json()) == state
    for broken in ("", "{", '{"query": 3}', "[]", '{"constraints": {"bogus": 1}}'):
        assert SessionState.from_json(broken) is None


@pytest.mark.parametrize("session_id", ["a b", "", "x" * 129, "é", "tab\there"])
def test_bad_session_ids_name_the_field(session_id: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_session_id(session_id)
    assert err.value.field_path == "session_id"


# -- sessions through the gateway -------------------------------------------------------------


def _rows(g: Gateway, ids: Any) -> np.ndarray:
    return g.catalog.rows(np.asarray(ids, np.int64))


def test_a_session_refines_its_last_page(gateway: Gateway, tiny_artifacts: Artifacts) -> None:
    catalog = tiny_artifacts.catalog
    cat, brand, _ = _common(catalog)
    first = gateway.search(query=cat, user_id="u1", page_size=10, session_id="s1")
    assert first.refinement is not None and first.refinement.turn == 1
    prices = catalog.price_cents[_rows(gateway, first.candidates.item_ids)]
    cheaper = gateway.search(query="cheaper", user_id="u1", page_size=10, session_id="s1")
    assert cheaper.refinement is not None and cheaper.refinement.turn == 2
    assert cheaper.searched_query == cat and len(cheaper.candidates)
    new_prices = catalog.price_cents[_rows(gateway, cheaper.candidates.item_ids)]
    assert new_prices.max() < np.median(prices)
    no_brand = gateway.search(query=f"not {brand}", user_id="u1", page_size=10, session_id="s1")
    rows = _rows(gateway, no_brand.candidates.item_ids)
    assert len(rows) and brand not in {catalog.brand_of(r) for r in rows.tolist()}
    assert catalog.price_cents[rows].max() < np.median(prices)  # the earlier turn still holds
    second = int(no_brand.candidates.item_ids[1])
    like = gateway.search(
        query="more like the second one", user_id="u1", page_size=10, session_id="s1"
    )
    assert like.refinement is not None and like.refinement.anchor_item_id == second
    assert second not in like.candidates.item_ids.tolist()
    # the same words without the session start over
    alone = gateway.search(query="cheaper", user_id="u1", page_size=10)
    assert alone.refinement is None and alone.searched_query == "cheaper"


def test_the_next_page_of_a_turn_is_that_turn_not_another(gateway: Gateway) -> None:
    first = gateway.search(query="shoes", user_id="u2", page_size=5, session_id="p")
    turn = gateway.search(query="cheaper", user_id="u2", page_size=5, session_id="p")
    assert turn.next_page_token and turn.refinement is not None
    bound = turn.refinement.constraints.price_max_cents
    nxt = gateway.search(
        query="cheaper", user_id="u2", page_size=5, session_id="p", page_token=turn.next_page_token
    )
    assert nxt.refinement is not None and nxt.refinement.turn == turn.refinement.turn
    assert nxt.refinement.constraints.price_max_cents == bound  # not cheaper again
    assert not set(nxt.candidates.item_ids.tolist()) & set(turn.candidates.item_ids.tolist())
    assert first.refinement is not None


def test_sessions_belong_to_their_shopper(gateway: Gateway) -> None:
    gateway.search(query="shoes", user_id="alice", page_size=5, session_id="same")
    gateway.search(query="cheaper", user_id="alice", page_size=5, session_id="same")
    bob = gateway.search(query="cheaper", user_id="bob", page_size=5, session_id="same")
    assert bob.refinement is not None and bob.refinement.turn == 1  # not alice's session
    anon = gateway.search(query="shoes", page_size=5, session_id="anon-1")
    assert anon.refinement is not None and anon.refinement.turn == 1
    again = gateway.search(query="cheaper", page_size=5, session_id="anon-1")
    assert again.refinement is not None and again.refinement.turn == 2


def test_a_long_hostile_session_stays_within_the_request_limits(
    gateway: Gateway, tiny_artifacts: Artifacts
) -> None:
    """Every turn adds words and exclusions; none may push the session past what a request
    or a stage accepts (filters, values per filter, query length)."""
    catalog = tiny_artifacts.catalog
    cat, _, _ = _common(catalog)
    words = Counter(w for t in catalog.titles for w in t.lower().split() if w.isalpha())
    common = [w for w, _ in words.most_common(40)]
    gateway.search(query=cat, user_id="h", page_size=5, session_id="long")
    for i in range(30):
        brand = catalog.brands[i % len(catalog.brands)]
        text = f"{common[i]} not {brand} {'x' * 120}{i}"
        turn = gateway.search(query=text, user_id="h", page_size=5, session_id="long")
        assert turn.refinement is not None
        assert len(turn.refinement.filters) <= 15
        assert len(turn.searched_query) <= 2048


def test_a_gateway_without_sessions_refuses_a_session_id(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    query_encoder: QueryEncoder,
    store: InMemoryStateStore,
) -> None:
    g = Gateway(
        local_stages,
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, store),
        query_encoder,
    )
    with pytest.raises(InvalidArgument) as err:
        g.search(query="shoes", page_size=5, session_id="s")
    assert err.value.field_path == "session_id"
