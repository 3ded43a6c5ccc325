"""``sluice eval blurbs --data ../shared/data/crowdflower-search``: do blurbs show why an
item matches a search when its title does not?

The subset: every judged-relevant product (grade 2 or 3 of 0..3) of every query whose title
holds none of the query's words (compared as BM25 stems, the commonest words left out, as
:func:`sluice.gateway.explain.query_terms` reads a query). For each, the extractive blurb
(:class:`sluice.gateway.blurbs.ExtractiveBlurbs`, no shopper history) and the first
sentence of the item's description: the share of each that holds a query word, and the
time per item with nothing cached. Also
reported: the blurb from MiniLM similarity alone (no term weight), and the share of items
whose description holds a query word anywhere (the most any blurb of its sentences can
reach).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from sluice.data.products import load_products, load_queries
from sluice.data.tokens import tokenize
from sluice.gateway.blurbs import ExtractiveBlurbs, item_sentences
from sluice.gateway.explain import query_terms

RELEVANT = 2


def has_term(text: str, terms: set[str]) -> bool:
    return bool(terms & set(tokenize(text)))


def run_blurbs(data: Path, out: Path | None = None) -> dict[str, Any]:
    from sluice.embed.text import MiniLMEncoder

    catalog = load_products(data)
    queries = load_queries(data)
    encoder = MiniLMEncoder(threads=2)
    variants = {
        "extractive blurb": ExtractiveBlurbs(catalog, None, encoder.encode),
        "MiniLM similarity alone": ExtractiveBlurbs(catalog, None, encoder.encode, term_weight=0),
    }
    hits = dict.fromkeys(variants, 0) | {"first sentence": 0, "anywhere in description": 0}
    items = with_description = 0
    seconds = dict.fromkeys(variants, 0.0)  # each encodes every item's sentences once (cold)
    failures: list[dict[str, str]] = []
    for text, judged in zip(queries.texts, queries.judgments, strict=True):
        terms = set(query_terms(text))
        rows = [
            r
            for item, grade in sorted(judged.items())
            if grade >= RELEVANT
            and (r := catalog.row(item)) >= 0
            and not has_term(catalog.titles[r], terms)
        ]
        if not rows or not terms:
            continue
        items += len(rows)
        blurbs = {}
        for name, v in variants.items():
            t0 = time.perf_counter()
            blurbs[name] = v.blurbs(np.asarray(rows), text, np.zeros(0, np.int64))
            seconds[name] += time.perf_counter() - t0
        for i, r in enumerate(rows):
            sentences = item_sentences(catalog, r)
            with_description += bool(sentences)
            hits["first sentence"] += has_term(sentences[0] if sentences else "", terms)
            hits["anywhere in description"] += has_term(catalog.descriptions[r], terms)
            for name in variants:
                hits[name] += has_term(blurbs[name][i], terms)
            if not has_term(blurbs["extractive blurb"][i], terms) and len(failures) < 10:
                failures.append({"query": text, "title": catalog.titles[r]})
    shares = {name: h / max(items, 1) for name, h in hits.items()}
    first = shares["first sentence"]
    cold_ms = {name: 1000 * s / max(items, 1) for name, s in seconds.items()}
    ratios = {name: share / first if first else float("inf") for name, share in shares.items()}
    report = {
        "dataset": str(data),
        "items": items,
        "items_with_description": with_description,
        "share_with_query_term": shares,
        "ratio_to_first_sentence": ratios,
        "cold_ms_per_item": cold_ms,
        "examples_without_term": failures,
    }
    print(
        f"\nblurbs on {items} judged-relevant items whose title lacks every query word "
        f"({with_description} with a description)\n"
        "| text | holds a query word | ratio to the first sentence |\n|---|---|---|"
    )
    for name, share in shares.items():
        print(f"| {name} | {share:.3f} | {ratios[name]:.2f} |")
    print(
        "cold cache, per item (its sentences encoded for the first time, the query once per "
        "query): " + ", ".join(f"{n} {v:.1f} ms" for n, v in cold_ms.items())
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"report: {out}")
    return report
