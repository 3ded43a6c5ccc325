"""Fairness of exposure over evaluation users, and what the re-ranking options cost in quality.

``sluice eval recommend --data DIR --exposure`` runs every evaluation user's Recommend
through the cascade in this process (the stages loaded through the services' wiring, as
:func:`sluice.eval.served.ablations` does), keeps what the gateway gave the re-ranking stage,
and re-ranks that same input under each setting of :data:`VARIANTS`. For each it reports
the quality of the page (HR@K, NDCG@K by the shared metric code) and who the top ``k`` of
the pages expose:

* the share of impressions per provider (a brand; an item of unknown brand is its own,
  :func:`sluice.rerank.exposure.provider_codes`), the largest of them, and the share that
  goes to the long-tail providers (:func:`sluice.rerank.exposure.tail_rows`);
* the Gini coefficient of impressions over every provider of the catalog (0: equal
  exposure; 1: one provider takes all);
* the share of catalog items, and of providers, ever shown.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sluice.domain import Budget, Candidates, RankContext, StageName, Surface
from sluice.rerank.exposure import provider_codes, tail_rows

EXPOSURE_K = 10


@dataclass(frozen=True)
class Variant:
    """One re-ranking setting: the fields of :class:`sluice.rerank.engine.RerankConfig`
    that differ from the deployed ones."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    needs_brands: bool = False  # a per-brand cap changes nothing without brands


VARIANTS = (
    Variant("as deployed"),
    Variant("relevance only (no MMR, no brand cap)", {"diversity_lambda": 1.0, "max_per_brand": 0}),
    Variant("brand cap 2", {"max_per_brand": 2}, needs_brands=True),
    Variant("brand cap 1", {"max_per_brand": 1}, needs_brands=True),
    *(Variant(f"tail share {p:.1f}", {"tail_share": p}) for p in (0.2, 0.4, 0.6, 0.8, 1.0)),
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


class _RerankInputs:
    """The re-ranking stage, keeping (per thread) what the gateway last gave it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stage = inner.stage
        self.local = threading.local()

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> Any:
        self.local.last = (ctx, cands, budget)
        return self.inner.call(ctx, cands, budget)


def exposure_section(split: Any, users: np.ndarray, threads: int = 2) -> dict[str, Any]:
    """Quality and exposure of the re-ranking variants on ``users`` (see the module)."""
    from sluice.config import RerankSettings
    from sluice.core.stage import run_stage
    from sluice.eval.served import (
        _recommend_request,
        fan_out,
        in_process_gateway,
        list_metrics,
        local_stages,
    )
    from sluice.rerank.engine import RerankEngine

    a = split.artifacts
    catalog = a.catalog
    stages = local_stages(a)
    deployed = stages[StageName.RERANK].engine
    recorder = _RerankInputs(stages[StageName.RERANK])
    gateway = in_process_gateway(a, stages | {StageName.RERANK: recorder})

    def record(i: int) -> tuple[Any, np.ndarray]:
        result = _recommend_request(
            gateway, user=split.user_ids[int(users[i])], surface=Surface.HOME
        )
        return recorder.local.last, catalog.rows(result.candidates.item_ids)

    print(f"\nexposure: the cascade in process on {len(users)} test users …", flush=True)
    recorded = fan_out(record, len(users), threads, False, "exposure")
    inputs = [r[0] for r in recorded]
    providers, _ = provider_codes(catalog)
    head_share = RerankSettings().exposure_head_share
    tail = tail_rows(catalog, a.popularity, head_share)
    has_brands = any(b != "unknown" for b in catalog.brands)
    header = (
        "| re-ranking | HR@10 | NDCG@10 | Gini | tail share | items shown | providers shown |\n"
        + "|---|---|---|---|---|---|---|"
    )
    print(
        f"providers: {len(np.unique(providers))}; long tail (outside the providers holding "
        f"{head_share:.0%} of training interactions): {len(np.unique(providers[tail]))} providers, "
        f"{int(tail.sum())} items\n" + header,
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
        config = dataclasses.replace(deployed.config, **variant.changes)
        engine = RerankEngine(catalog, deployed.vectors, config, tail)

        def rank(i: int, engine: RerankEngine = engine) -> np.ndarray:
            ctx, cands, budget = inputs[i]
            page = run_stage(StageName.RERANK, engine, ctx, cands, budget).candidates
            return catalog.rows(page.item_ids)

        pages = fan_out(rank, len(users), threads, False, variant.name)
        quality = list_metrics(pages, split, users)
        exposure = exposure_metrics(pages, providers, tail)
        exposure["largest"] = [
            (_provider_name(catalog, code), share) for code, share in exposure["largest"]
        ]
        entry: dict[str, Any] = {"changes": variant.changes, "quality": quality} | exposure
        if not variant.changes:  # the replay reproduces the served pages
            entry["same_as_gateway"] = sum(
                np.array_equal(p[:EXPOSURE_K], r[1][:EXPOSURE_K])
                for p, r in zip(pages, recorded, strict=True)
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
