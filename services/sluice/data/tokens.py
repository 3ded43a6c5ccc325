"""Word tokens as BM25 reads them: lower-cased, English-stemmed (no bm25s import, so that
the gateway can match query terms the way recall's lexical source does)."""

from __future__ import annotations

import re

import Stemmer

_TOKEN = re.compile(r"(?u)\b\w+\b")
_stemmer = Stemmer.Stemmer("english")


def tokenize(text: str, stem: bool = True) -> list[str]:
    """Lower-case word tokens, English-stemmed unless ``stem=False`` (indexing and queries)."""
    words = _TOKEN.findall(text.lower())
    if not stem:
        return [str(w) for w in words]
    return [str(w) for w in _stemmer.stemWords(words)]
