from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.data.catalog import Catalog
from sluice.gateway.spelling import Speller

TITLES = [
    "Adidas Fragrance for Men",
    "Adidas fragrance gift set",
    "Fragrance sampler",
    "Assassins Creed III",
    "Assassins Creed Unity",
    "Toy Truck with lights",
    "Toy Truck, red",
    "Fragrant candle",  # used once: no correction target
    "External hard drive 500 GB",
    "External hard drive 1 TB",
    "Fragile glass vase",
    "Fragile stickers",
    "Fragile stickers, large",
]


@pytest.fixture
def speller() -> Speller:
    return Speller(TITLES)


@pytest.mark.parametrize(
    ("query", "searched"),
    [
        ("adidas fragance", "adidas fragrance"),  # a letter missing
        ("Assassinss Creed", "assassins creed"),  # one too many; lower-cased when corrected
        ("extenal hard drive", "external hard drive"),
        ("fargrance", "fragrance"),  # two adjacent letters swapped
    ],
)
def test_a_word_the_catalog_never_uses_is_searched_as_its_word(
    speller: Speller, query: str, searched: str
) -> None:
    assert speller.correct(query) == searched


@pytest.mark.parametrize(
    "query",
    [
        "Toy Trucks",  # unknown word, known stem: BM25 matches it already
        "adidas",  # known
        "fragrant",  # known, though used once
        "fragranc",  # the stem of "fragrance": BM25 matches it already
        "vse",  # short
        "500gb",  # digits
        "fräg",  # not ASCII
        "zzzzzzzz",  # nothing one edit away
    ],
)
def test_known_short_or_unmatched_words_are_searched_as_typed(speller: Speller, query: str) -> None:
    assert speller.correct(query) == query


def test_the_most_used_neighbour_wins_and_rare_words_are_no_target() -> None:
    # only "fragrant" is one edit from "fragrnt", and one title uses it: a catalog typo
    # would be as rare, so such a word is never a correction
    speller = Speller(["fragile a", "fragile b", "fragile c", "fragrant d"])
    assert speller.correct("fragrnt") == "fragrnt"
    speller = Speller(["fragrant a", "fragrant b", "fragrance c", "fragrance d", "fragrance e"])
    assert speller.correct("fragranct") == "fragrance"  # 3 uses against 2


def test_items_added_live_teach_their_words() -> None:
    catalog = Catalog.from_columns(
        item_ids=[1, 2, 3], titles=["Zorbex kettle", "Zorbex toaster", "Zorbex mug"]
    )
    speller = Speller(["kettle", "toaster"])
    assert speller.correct("zorbexx") == "zorbexx"  # nothing one edit away yet
    speller.learn(catalog, [0])
    assert speller.correct("zorbex") == "zorbex"  # known now: never corrected away
    assert speller.correct("zorbexx") == "zorbexx"  # used once: not yet a target
    speller.learn(catalog, [1, 2])
    assert speller.correct("zorbexx") == "zorbex"


def test_a_query_of_nonsense_looks_up_a_bounded_number_of_words(
    speller: Speller, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    nearest = speller._nearest

    def counting(word: str) -> Any:
        looked_up.append(word)
        return nearest(word)

    monkeypatch.setattr(speller, "_nearest", counting)
    query = " ".join(["fargrance"] * 500)
    corrected = speller.correct(query).split()
    assert len(looked_up) == speller.max_corrections
    assert corrected[: speller.max_corrections] == ["fragrance"] * speller.max_corrections
    assert corrected[speller.max_corrections :] == ["fargrance"] * (500 - speller.max_corrections)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("adefgimnrstu xÄ1!-"), max_size=60))
def test_any_text_gives_a_query_that_a_second_pass_leaves_alone(text: str) -> None:
    speller = Speller(TITLES)
    once = speller.correct(text)
    assert isinstance(once, str)
    if len(text.split()) <= speller.max_corrections:
        assert speller.correct(once) == once
