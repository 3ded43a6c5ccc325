"""Query spelling: a word the catalog never uses is replaced by the catalog word one typo away.

The targets are the words of the catalog's titles, brands and categories, with their counts
over items. A query word is left alone when it is short (under ``min_length`` letters), holds
anything but ASCII letters, or the catalog knows it: a target, a word of at least two
descriptions, a word of an item added live, or the English stem of any of those (so "trucks"
stays when titles say "truck": BM25 matches stems anyway). Any other word is replaced by the
most used target at Damerau-Levenshtein distance 1 (one letter inserted, deleted, replaced,
or two adjacent letters swapped; rapidfuzz) that at least ``min_count`` items use; without
one it stays as typed. "adidas fragance" is searched as "adidas fragrance". At most
``max_corrections`` words of a query are looked up, so a long query of nonsense costs a
bounded amount of work.

Only the corrected words of the query change; the rest of its text stays as typed. The
gateway answers with the query it searched (``SearchResponse.searched_query``), so a
storefront can say "showing results for ...". The vocabulary is English-minded: a word of
another language, or a brand the shop does not carry, that is one typo from a catalog word is
searched as that word.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rapidfuzz import process
from rapidfuzz.distance import DamerauLevenshtein

from sluice.data.catalog import Catalog
from sluice.data.tokens import tokenize

if TYPE_CHECKING:
    from sluice.config import GatewaySettings

MIN_LENGTH = 5
MIN_COUNT = 2
MAX_CORRECTIONS = 4
_WORD = re.compile(r"(?u)\b\w+\b")  # the tokens of sluice.data.tokens.tokenize


class Speller:
    """Corrects query words the catalog does not know (see the module's text)."""

    def __init__(
        self,
        targets: Iterable[str],
        known: Iterable[str] = (),
        min_length: int = MIN_LENGTH,
        min_count: int = MIN_COUNT,
        max_corrections: int = MAX_CORRECTIONS,
    ) -> None:
        """``targets``: texts whose words a query word may become (one text per item);
        ``known``: texts whose words, used in ``min_count`` of them, are never corrected."""
        self.min_length = min_length
        self.max_corrections = max_corrections
        self._counts = Counter(w for text in targets for w in set(tokenize(text, stem=False)))
        others = Counter(w for text in known for w in set(tokenize(text, stem=False)))
        self._known = set(self._counts) | {w for w, n in others.items() if n >= min_count}
        self._stems = set(tokenize(" ".join(self._known)))
        # the targets by length; never changed after this, so lookups need no lock
        self._by_length: dict[int, list[str]] = {}
        for w, n in self._counts.items():
            if n >= min_count and w.isalpha():
                self._by_length.setdefault(len(w), []).append(w)

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Speller:
        rows = range(len(catalog.titles))
        return cls((item_words(catalog, r) for r in rows), catalog.descriptions)

    def learn(self, catalog: Catalog, rows: Iterable[int]) -> None:
        """Words of these catalog rows (items added or changed live) are known from now on:
        never corrected away. They become correction targets with the next build."""
        words = {w for r in rows for w in tokenize(item_words(catalog, int(r)), stem=False)}
        self._stems.update(tokenize(" ".join(words)))
        self._known.update(words)  # set updates are atomic under the GIL: readers never lock

    def correct(self, query: str) -> str:
        """``query`` with its unknown words replaced; as typed when none was."""
        out, last, looked_up = [], 0, 0
        for match in _WORD.finditer(query):
            word = match.group().lower()
            if looked_up == self.max_corrections or not self._unknown(word):
                continue
            looked_up += 1
            fixed = self._nearest(word)
            if fixed is not None:
                out += [query[last : match.start()], fixed]
                last = match.end()
        return "".join([*out, query[last:]]) if out else query

    def _unknown(self, word: str) -> bool:
        if len(word) < self.min_length or not word.isalpha() or not word.isascii():
            return False
        return word not in self._known and tokenize(word)[0] not in self._stems

    def _nearest(self, word: str) -> str | None:
        hits = [
            hit
            for n in (-1, 0, 1)
            for hit, _, _ in process.extract(
                word,
                self._by_length.get(len(word) + n, ()),
                scorer=DamerauLevenshtein.distance,
                score_cutoff=1,
                limit=None,
            )
        ]
        return min((-self._counts[w], w) for w in hits)[1] if hits else None


def item_words(catalog: Catalog, row: int) -> str:
    """The text of one item that spelling targets: its title, brand and category."""
    brand = catalog.brands[catalog.brand_codes[row]] if len(catalog.brand_codes) else ""
    category = (
        catalog.categories[catalog.category_codes[row]] if len(catalog.category_codes) else ""
    )
    return f"{catalog.titles[row]} {brand} {category}"


def speller_for(catalog: Catalog, settings: GatewaySettings | None = None) -> Speller | None:
    """The gateway's speller for ``catalog``; None when its settings turn spelling off."""
    from sluice.config import GatewaySettings

    on = (settings or GatewaySettings()).spell_correction
    return Speller.from_catalog(catalog) if on else None
