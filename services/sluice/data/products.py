"""Search-only datasets: a product catalog without interactions, with labelled queries.

Layout of a dataset directory (the one of ``../shared/data/crowdflower-search``):

* ``products.jsonl`` — one product per line: ``{"product_id", "title", "description"}``.
  Ids such as ``p00001`` become integer item ids (``p00001`` → 1): the catalog
  speaks integers everywhere else.
* ``queries.jsonl`` (optional) — ``{"query_id", "query"}`` per line.
* ``qrels.tsv`` (optional) — TREC relevance judgments ``query_id 0 product_id grade``
  (whitespace separated, grade an integer >= 0).

There is no interaction log: :func:`is_search_only` tells the build to take
its path for catalogs without behaviour.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sluice.data.catalog import Catalog

PRODUCTS = "products.jsonl"
QUERIES = "queries.jsonl"
QRELS = "qrels.tsv"

_DIGITS = re.compile(r"(\d+)$")


def product_number(product_id: str) -> int:
    """``p00001`` → 1: the trailing digits of a product id as the integer item id."""
    m = _DIGITS.search(product_id.strip())
    if m is None:
        raise ValueError(f"product id {product_id!r} has no trailing number")
    return int(m.group(1))


def product_id_of(item_id: int, width: int = 5) -> str:
    """The inverse of :func:`product_number` for the ``p`` + zero-padded layout."""
    return f"p{int(item_id):0{width}d}"


def is_search_only(directory: Path) -> bool:
    """A products catalog without an interaction log."""
    return (directory / PRODUCTS).exists() and not any(
        (directory / name).exists() for name in ("interactions.tsv.gz", "interactions.tsv")
    )


def load_products(directory: Path) -> Catalog:
    """Read ``products.jsonl`` into a catalog (title and description; no other attributes)."""
    ids: list[int] = []
    titles: list[str] = []
    descriptions: list[str] = []
    with open(directory / PRODUCTS, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            ids.append(product_number(str(rec["product_id"])))
            titles.append(" ".join(str(rec.get("title") or "").split()))
            descriptions.append(" ".join(str(rec.get("description") or "").split()))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{directory / PRODUCTS}: product ids collide after numbering")
    return Catalog.from_columns(ids, titles, descriptions=descriptions)


@dataclass
class LabelledQueries:
    """Queries with graded judgments; item ids are the catalog's integer ids."""

    query_ids: list[str]
    texts: list[str]
    judgments: list[dict[int, int]]  # per query: item id -> grade

    def __len__(self) -> int:
        return len(self.query_ids)


def load_queries(directory: Path) -> LabelledQueries:
    """Read ``queries.jsonl`` and ``qrels.tsv``; queries without judgments keep an empty dict."""
    ids: list[str] = []
    texts: list[str] = []
    with open(directory / QUERIES, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                ids.append(str(rec["query_id"]))
                texts.append(str(rec["query"]))
    index = {q: i for i, q in enumerate(ids)}
    judgments: list[dict[int, int]] = [{} for _ in ids]
    with open(directory / QRELS, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) != 4:
                continue
            qid, _, pid, grade = parts
            if qid in index:
                judgments[index[qid]][product_number(pid)] = int(grade)
    return LabelledQueries(ids, texts, judgments)
