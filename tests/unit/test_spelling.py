from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.data.catalog import Catalog
from sluice.data.tokens import tokenize
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
        ("Assassinss Creed", "assassins Creed"),  # one too many; the rest stays as typed
        ("extenal hard drive", "external hard drive"),
        ("fargrance", "fragrance"),  # two adjacent letters swapped
        ("Fragance (men's) t-shirt, $50!", "fragrance (men's) t-shirt, $50!"),
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
        item_ids=[1, 2], titles=["Zorbex kettle", "Kettle"], brands=["Brevilla", "x"]
    )
    speller = Speller(["kettle a", "kettle b", "zorbet c", "zorbet d", "brevill e", "brevill f"])
    assert speller.correct("zorbex brevilla") == "zorbet brevill"  # unknown yet: corrected
    speller.learn(catalog, [0])  # its title and its brand
    assert speller.correct("zorbex brevilla") == "zorbex brevilla"  # known now: as typed
    assert speller.correct("zorbexx") == "zorbexx"  # a live word is no target until a build


def test_words_of_two_descriptions_are_known_but_no_target() -> None:
    speller = Speller(["waterproof a", "waterproof b"], known=["waterprof x", "waterprof y"])
    assert speller.correct("waterprof") == "waterprof"  # two descriptions use it
    speller = Speller(["waterproof a", "waterproof b"], known=["waterprof x"])
    assert speller.correct("waterprof") == "waterproof"  # one description: a typo there


def test_from_catalog_targets_titles_brands_and_categories() -> None:
    catalog = Catalog.from_columns(
        item_ids=[1, 2],
        titles=["Kettle", "Toaster"],
        brands=["Brevilla", "Brevilla"],
        categories=["Kitchen", "Kitchen"],
        descriptions=["made of steell", "made of steell"],
    )
    speller = Speller.from_catalog(catalog)
    assert speller.correct("brevila kitchn steell") == "brevilla kitchen steell"


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
def test_any_text_is_searched_as_typed_or_with_catalog_words(text: str) -> None:
    speller = Speller(TITLES)
    once = speller.correct(text)
    typed, searched = tokenize(text, stem=False), tokenize(once, stem=False)
    assert len(searched) == len(typed)  # words are replaced, never added or dropped
    vocabulary = set(tokenize(" ".join(TITLES), stem=False))
    assert all(a == b or b in vocabulary for a, b in zip(typed, searched, strict=True))
    if len(typed) <= speller.max_corrections:
        assert speller.correct(once) == once  # a second pass changes nothing
