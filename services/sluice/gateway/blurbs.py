"""Short product blurbs that say what in an item matches this shopper.

A blurb is taken from the item's own words. :class:`ExtractiveBlurbs`, the default, splits
the item's description into sentences, adds a sentence per known attribute ("Brand: X."),
and picks the ones closest to what the shopper wants:

* the *intent*: the query's MiniLM vector on a search, plus the mean text vector of the
  shopper's recent items (:data:`RECENT_WEIGHT`); on a recommendation, the recent items
  alone;
* the *terms*: the query's words, and the brand and category of the recent items; a
  sentence scores :data:`TERM_WEIGHT` for each share of them it contains.

The best :data:`MAX_SENTENCES` sentences, most relevant first, within :data:`MAX_CHARS`,
make the blurb. Sentence vectors are computed on first use and kept in a bounded cache by
sentence text, so that a sentence (``Brand: Acme.`` is shared by every Acme item) costs an
encoder call once. One request encodes at most :data:`MAX_NEW_SENTENCES` new sentences: an
item beyond them is blurbed by the shopper's words alone, and its sentences are encoded by
later requests.

:class:`GeneratedBlurbs` asks an OpenAI-compatible chat-completions server (vLLM, TGI,
Triton's OpenAI front end) for a blurb, with a prompt that holds only the item's own text
and the shopper's query. An answer with a word that is neither in the item's text nor in
:data:`_GLUE` is refused (a query word the item's text lacks too: the shopper's wish is not
the item's fact), and the extractive blurb stands instead.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from cachetools import LRUCache
from prometheus_client import Counter

from sluice.data.catalog import UNKNOWN, Catalog
from sluice.data.tokens import tokenize
from sluice.gateway.explain import query_terms

log = logging.getLogger(__name__)

GENERATED = Counter(
    "sluice_blurbs_generated_total",
    "Blurbs asked of the text-generation server, by outcome",
    ["outcome"],  # served, refused (not grounded in the item's text), failed (no answer)
)

MAX_SENTENCES = 2
MAX_CHARS = 280
MAX_ITEM_SENTENCES = 24  # read this far into a description
RECENT_WEIGHT = 0.5  # the recent items' share of a search's intent
RECENT_ITEMS = 5
TERM_WEIGHT = 0.5  # a sentence with every term scores this much above its similarity
MAX_NEW_SENTENCES = 256  # encoded per request at most; the rest on later requests
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\s*[\n\u2022|]+\s*|\s+-\s+(?=[A-Z])")


class Blurbs(Protocol):
    def blurbs(self, rows: np.ndarray, query: str, recent_rows: np.ndarray) -> list[str]:
        """One blurb per catalog row of ``rows`` ("" when the item has nothing to say)."""
        ...


def item_sentences(catalog: Catalog, row: int) -> list[str]:
    """The item's description as sentences, then one sentence per known attribute."""
    text = catalog.descriptions[row] if row < len(catalog.descriptions) else ""
    out: list[str] = []
    seen: set[str] = set()
    for part in _SENTENCE.split(text):
        sentence = part.strip(" -*;,")
        key = sentence.lower()
        if len(sentence.split()) >= 3 and key not in seen:
            seen.add(key)
            out.append(sentence if len(sentence) <= MAX_CHARS else sentence[: MAX_CHARS - 1] + "…")
        if len(out) == MAX_ITEM_SENTENCES:
            break
    brand = catalog.brand_of(row)
    category = catalog.categories[catalog.category_codes[row]]
    if brand != UNKNOWN:
        out.append(f"Brand: {brand}.")
    if category != UNKNOWN:
        out.append(f"Category: {category}.")
    return out


class ExtractiveBlurbs:
    """The default blurbs: the item's own sentences closest to the shopper (see the module)."""

    def __init__(
        self,
        catalog: Catalog,
        item_vectors: np.ndarray | None,
        encode: Callable[[Sequence[str]], np.ndarray],
        cache_sentences: int = 200_000,
        term_weight: float = TERM_WEIGHT,
        max_new_sentences: int = MAX_NEW_SENTENCES,
    ) -> None:
        """``item_vectors``: the catalog's MiniLM text vectors (None: the recent items add
        their terms, not their vectors); ``encode``: MiniLM, unit vectors for a list of
        texts."""
        self.catalog = catalog
        self.vectors = item_vectors
        self.encode = encode
        self.term_weight = term_weight
        self.max_new_sentences = max_new_sentences
        self._cache: LRUCache[str, np.ndarray] = LRUCache(cache_sentences)
        self._lock = threading.Lock()

    def sentence_vectors(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors of ``sentences`` that are cached or among the first
        ``max_new_sentences`` new ones (encoded in one call, then cached)."""
        with self._lock:
            known = {s: v for s in sentences if (v := self._cache.get(s)) is not None}
        missing = list(dict.fromkeys(s for s in sentences if s not in known))
        missing = missing[: self.max_new_sentences]
        if missing:
            fresh = np.asarray(self.encode(missing), np.float32)
            with self._lock:
                for text, vec in zip(missing, fresh, strict=True):
                    self._cache[text] = vec
                    known[text] = vec
        return known

    def blurbs(self, rows: np.ndarray, query: str, recent_rows: np.ndarray) -> list[str]:
        rows_list = [int(r) for r in np.asarray(rows).tolist()]
        recent = [int(r) for r in np.asarray(recent_rows).tolist() if 0 <= r < len(self.catalog)]
        recent = recent[-RECENT_ITEMS:]
        intent, terms = self._intent(query, recent)
        n = len(self.catalog)
        per_row = {r: item_sentences(self.catalog, r) for r in rows_list if 0 <= r < n}
        vectors = self.sentence_vectors([t for texts in per_row.values() for t in texts])
        out = []
        for r in rows_list:
            texts = per_row.get(r)
            if not texts:
                out.append("")
                continue
            score = np.zeros(len(texts))
            if intent is not None and all(t in vectors for t in texts):
                score = np.stack([vectors[t] for t in texts]) @ intent
            if terms:
                score = score + self.term_weight * np.array(
                    [len(terms & set(tokenize(t))) / len(terms) for t in texts]
                )
            out.append(_join([texts[i] for i in np.argsort(-score, kind="stable")]))
        return out

    def _intent(self, query: str, recent: list[int]) -> tuple[np.ndarray | None, set[str]]:
        query = query.strip()
        terms = set(query_terms(query))
        parts: list[np.ndarray] = []
        if query:
            parts.append(np.asarray(self.sentence_vectors([query])[query], np.float64))
        if recent and self.vectors is not None:
            mean = self.vectors[recent].astype(np.float64).mean(axis=0)
            parts.append(RECENT_WEIGHT * mean if parts else mean)
        if recent:
            for r in recent:
                for name in (
                    self.catalog.brand_of(r),
                    self.catalog.categories[self.catalog.category_codes[r]],
                ):
                    if name != UNKNOWN:
                        terms |= set(query_terms(name))
        if not parts:
            return None, terms
        intent = np.sum(parts, axis=0)
        norm = np.linalg.norm(intent)
        return (intent / norm if norm > 0 else intent).astype(np.float32), terms


def _join(sentences: list[str]) -> str:
    """The first sentences, up to :data:`MAX_SENTENCES`, within :data:`MAX_CHARS`."""
    out: list[str] = []
    for s in sentences:
        s = s if s.endswith((".", "!", "?", "…")) else s + "."
        if out and len(" ".join([*out, s])) > MAX_CHARS:
            break
        out.append(s)
        if len(out) == MAX_SENTENCES:
            break
    return " ".join(out)


# words a generated blurb may use although the item's text lacks them
_GLUE = frozenset(
    {"a", "an", "and", "the", "for", "of", "in", "on", "with", "to", "by", "at", "from", "or"}
    | {"is", "are", "it", "its", "this", "that", "these", "as", "you", "your", "all", "also"}
    | {"has", "have", "can", "be", "made", "comes", "great", "brand", "category"}
)


def grounded(text: str, sources: Sequence[str]) -> bool:
    """Whether every word of ``text`` is in one of ``sources`` or is :data:`_GLUE`
    (compared as BM25 stems, so "lights" is grounded by "light")."""
    allowed = {t for s in sources for t in tokenize(s)} | set(tokenize(" ".join(_GLUE)))
    words = tokenize(text)
    return bool(words) and all(w in allowed for w in words)


class GeneratedBlurbs:
    """Blurbs from an OpenAI-compatible ``/v1/chat/completions`` server, grounded in the
    item's own text; the ``fallback`` blurb wherever an answer is refused or fails."""

    def __init__(
        self,
        catalog: Catalog,
        fallback: Blurbs,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout_s: float = 2.0,
        max_tokens: int = 80,
    ) -> None:
        self.catalog = catalog
        self.fallback = fallback
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blurbs")

    def blurbs(self, rows: np.ndarray, query: str, recent_rows: np.ndarray) -> list[str]:
        out = self.fallback.blurbs(rows, query, recent_rows)
        items = [(i, int(r)) for i, r in enumerate(np.asarray(rows).tolist())]
        items = [(i, r) for i, r in items if 0 <= r < len(self.catalog)]
        answers = self._pool.map(lambda item: self.generate(item[1], query), items)
        for (i, _), text in zip(items, answers, strict=True):
            if text is not None:
                out[i] = text
        return out

    def generate(self, row: int, query: str) -> str | None:
        """The server's blurb for ``row``, or None when it fails or is not grounded."""
        title = self.catalog.titles[row]
        sources = [title, *item_sentences(self.catalog, row)]
        prompt = (
            "Write one short sentence for a shopper about the product below. Use only facts "
            "and words from the product text; do not add claims.\n"
            f"Shopper's search: {query or '(none)'}\nProduct text:\n" + "\n".join(sources)
        )
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                answer = json.loads(resp.read())
            text = str(answer["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError):
            GENERATED.labels("failed").inc()
            log.warning("blurb generator failed", extra={"url": self.url}, exc_info=True)
            return None
        if not grounded(text, sources):
            GENERATED.labels("refused").inc()
            log.info("generated blurb refused: not grounded in the item's text")
            return None
        GENERATED.labels("served").inc()
        return text
