"""Query spelling: a word the catalog never uses is replaced by the catalog word one typo away.

The vocabulary is every word of the catalog's titles, brands and categories, with its count.
A query word is left alone when the catalog uses it, or its English stem (so "trucks" stays
when titles say "truck": BM25 matches stems anyway), or when it is short (under
``min_length`` letters), holds a digit or any character but a letter. Any other word is
replaced by the most frequent catalog word at Damerau-Levenshtein distance 1 (one letter
inserted, deleted, replaced, or two adjacent letters swapped) that the catalog uses at least
``min_count`` times; without one it stays as typed. "adidas fragance" is searched as "adidas
fragrance". At most ``max_corrections`` words of a query are looked up, so a long query of
nonsense costs a bounded amount of work.

The gateway answers with the query it searched (``SearchResponse.searched_query``), so a
storefront can say "showing results for ...". Items added live teach their words
(:meth:`Speller.learn`); a word only a live item uses is never corrected away.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

from rapidfuzz import process
from rapidfuzz.distance import DamerauLevenshtein

from sluice.data.catalog import Catalog
from sluice.data.tokens import tokenize

MIN_LENGTH = 5
MIN_COUNT = 2
MAX_CORRECTIONS = 4


class Speller:
    """Corrects query words the catalog does not know (see the module's text)."""

    def __init__(
        self,
        texts: Iterable[str],
        min_length: int = MIN_LENGTH,
        min_count: int = MIN_COUNT,
        max_corrections: int = MAX_CORRECTIONS,
    ) -> None:
        self.min_length = min_length
        self.min_count = min_count
        self.max_corrections = max_corrections
        self._counts: Counter[str] = Counter()
        self._stems: set[str] = set()
        self._by_length: dict[int, list[str]] = {}  # correction targets (min_count or more)
        self._lock = threading.Lock()  # learn() runs on the update thread
        self._add(texts)

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> Speller:
        return cls([*catalog.titles, *catalog.brands, *catalog.categories])

    def learn(self, catalog: Catalog, rows: Iterable[int]) -> None:
        """The words of these catalog rows' titles (items added or renamed live)."""
        self._add(catalog.titles[int(r)] for r in rows)

    def _add(self, texts: Iterable[str]) -> None:
        words = Counter(w for text in texts for w in tokenize(text, stem=False))
        with self._lock:
            before = {w: self._counts[w] for w in words}
            self._counts.update(words)
            self._stems.update(tokenize(" ".join(words), stem=True))
            for w, n in words.items():
                if before[w] < self.min_count <= before[w] + n and w.isalpha():
                    self._by_length.setdefault(len(w), []).append(w)

    def correct(self, query: str) -> str:
        """``query`` with its unknown words corrected; unchanged (as typed) when none was."""
        words = tokenize(query, stem=False)
        fixed, looked_up = [], 0
        for w in words:
            if looked_up < self.max_corrections and self._unknown(w):
                looked_up += 1
                fixed.append(self._nearest(w) or w)
            else:
                fixed.append(w)
        return " ".join(fixed) if fixed != words else query

    def _unknown(self, word: str) -> bool:
        if len(word) < self.min_length or not word.isalpha() or not word.isascii():
            return False
        return word not in self._counts and tokenize(word)[0] not in self._stems

    def _nearest(self, word: str) -> str | None:
        with self._lock:
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
            if not hits:
                return None
            return min((-self._counts[w], w) for w in hits)[1]
