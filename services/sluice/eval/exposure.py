"""Fairness of exposure over evaluation users, and what the re-ranking options cost in quality.

``sluice eval recommend --data DIR --exposure`` replays every evaluation user's
re-ranking input (:mod:`sluice.eval.replay`) under each setting of :data:`VARIANTS`. For
each it reports the quality of the page (HR@K, NDCG@K by the shared metric code) and who
the top ``k`` of the pages expose:

* the share of impressions per provider (a brand; an item of unknown brand is its own,
  :func:`sluice.rerank.exposure.provider_codes`), the largest of them, and the share that
  goes to the long-tail providers (:func:`sluice.rerank.exposure.tail_rows`);
* the Gini coefficient of impressions over every provider of the catalog (0: equal
  exposure; 1: one provider takes all);
* the share of catalog items, and of providers, ever shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sluice.domain import RerankOverrides
from sluice.rerank.exposure import provider_codes, tail_rows

EXPOSURE_K = 10


@dataclass(frozen=True)
class Variant:
    """One re-ranking setting: the request's ``RerankOverrides``, as an experiment arm
    would send them."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    needs_brands: bool = False  # a per-brand cap changes nothing without brands


VARIANTS = (
    Variant("as deployed"),
    Variant("relevance only (no MMR, no brand cap)", {"diversity_lambda": 1.0, "max_per_brand": 0}),
    Variant("brand cap 2", {"max_per_brand": 2}, needs_brands=True),
    Variant("brand cap 1", {"max_per_brand": 1}, needs_brands=True),
    *(
        Variant(f"tail share {p:.1f}", {"exposure_tail_share": p})
        for p in (0.2, 0.4, 0.6, 0.8, 1.0)
    ),
)


def gini(values: np.ndarray) -> float:
    """The Gini coefficient of non-negative ``values`` (0 when all are equal or all zero)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2.0 * (ranks * x).sum()) / (n * total) - (n + 1) / n)


def exposure_metrics(
    pages: Sequence[np.ndarray], providers: np.ndarray, tail: np.ndarray, k: int = EXPOSURE_K
) -> dict[str, Any]:
    """Who the top ``k`` of ``pages`` (catalog rows, best first; -1 ignored) expose.

    ``providers`` and ``tail`` are per catalog row. Shares count impressions: one per item
    per page.
    """
    tops = [p[:k][p[:k] >= 0] for p in pages]
    shown = np.concatenate(tops) if tops else np.zeros(0, np.int64)
    present, codes = np.unique(providers, return_inverse=True)  # providers with items
    counts = np.bincount(codes[shown], minlength=len(present)).astype(np.float64)
    total = max(counts.sum(), 1.0)
    largest = np.argsort(-counts, kind="stable")[:5]
    return {
        "impressions": int(counts.sum()),
        "gini": gini(counts),
        "tail_share": float(tail[shown].mean()) if len(shown) else 0.0,
        "item_coverage": float(len(np.unique(shown)) / len(providers)),
        "provider_coverage": float((counts > 0).sum() / len(present)),
        "largest": [(int(present[c]), float(counts[c] / total)) for c in largest],
    }


def exposure_section(split: Any, users: np.ndarray, threads: int = 2) -> dict[str, Any]:
    """Quality and exposure of the re-ranking variants on ``users`` (see the module)."""
    from sluice.config import RerankSettings
    from sluice.eval.replay import record_rerank_inputs, replay
    from sluice.eval.served import list_metrics

    catalog = split.artifacts.catalog
    recorded = record_rerank_inputs(split, users, threads)
    providers, _ = provider_codes(catalog)
    head_share = RerankSettings().exposure_head_share
    tail = tail_rows(catalog, split.artifacts.popularity, head_share)
    has_brands = any(b != "unknown" for b in catalog.brands)
    header = (
        "| re-ranking | HR@10 | NDCG@10 | Gini | tail share | items shown | providers shown |\n"
        + "|---|---|---|---|---|---|---|"
    )
    print(
        f"providers: {len(np.unique(providers))}; long tail (outside the providers holding "
        f"{head_share:.0%} of training interactions): {len(np.unique(providers[tail]))} "
        f"providers, {int(tail.sum())} items\n" + header,
        flush=True,
    )
    out: dict[str, Any] = {
        "users": len(users),
        "k": EXPOSURE_K,
        "providers": len(np.unique(providers)),
        "tail_providers": len(np.unique(providers[tail])),
        "tail_items": int(tail.sum()),
        "variants": {},
    }
    for variant in VARIANTS:
        if variant.needs_brands and not has_brands:
            continue
        pages = replay(split, recorded, RerankOverrides(**variant.changes), threads)
        quality = list_metrics(pages, split, users)
        exposure = exposure_metrics(pages, providers, tail)
        exposure["largest"] = [
            (_provider_name(catalog, code), share) for code, share in exposure["largest"]
        ]
        entry: dict[str, Any] = {"changes": variant.changes, "quality": quality} | exposure
        if not variant.changes:  # the replay reproduces the served pages
            entry["same_as_gateway"] = sum(
                np.array_equal(p[:EXPOSURE_K], r[:EXPOSURE_K])
                for p, r in zip(pages, recorded.pages, strict=True)
            )
        out["variants"][variant.name] = entry
        print(
            f"| {variant.name} | {quality['HR@10']:.4f} | {quality['NDCG@10']:.4f} | "
            f"{exposure['gini']:.3f} | {exposure['tail_share']:.3f} | "
            f"{exposure['item_coverage']:.3f} | {exposure['provider_coverage']:.3f} |",
            flush=True,
        )
    first = out["variants"]["as deployed"]
    print(
        "largest providers as deployed: "
        + ", ".join(f"{name} {share:.3f}" for name, share in first["largest"])
        + f"; replayed pages equal to the gateway's: {first['same_as_gateway']}/{len(users)}"
    )
    return out


def _provider_name(catalog: Any, code: int) -> str:
    brands = len(catalog.brands)
    if code < brands:
        return str(catalog.brands[code])
    return f"item {int(catalog.item_ids[code - brands])}"
