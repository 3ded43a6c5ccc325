"""Replay the last stages: every evaluation user's Recommend runs once through the cascade
in this process (the stages loaded through the services' wiring), the inputs the gateway
gave the fine-ranking and re-ranking stages are kept, and the same input is ranked again
under other settings: an exposure setting (:mod:`sluice.eval.exposure`) or an experiment's
arm (:mod:`sluice.eval.arms`). The settings travel as the request's ``RerankOverrides`` and
``FineOverrides``, the way an experiment arm's do when served; with fine-ranking settings,
the fine stage runs again and re-ranking takes its new output.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from sluice.domain import (
    Budget,
    Candidates,
    FineOverrides,
    RankContext,
    RerankOverrides,
    StageName,
    Surface,
)


class _Inputs:
    """A stage, keeping (per thread) what the gateway last gave it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stage = inner.stage
        self.local = threading.local()

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> Any:
        self.local.last = (ctx, cands, budget)
        return self.inner.call(ctx, cands, budget)


@dataclass
class Recorded:
    """Per user: the re-ranking and fine-ranking stages' inputs, and the page the gateway
    served (rows)."""

    inputs: list[tuple[RankContext, Candidates, Budget]]
    pages: list[np.ndarray]
    engine: Any  # the deployed re-ranking engine
    fine_inputs: list[tuple[RankContext, Candidates, Budget]]
    fine_engine: Any


def record_rerank_inputs(split: Any, users: np.ndarray, threads: int = 2) -> Recorded:
    from sluice.eval.served import (
        _recommend_request,
        fan_out,
        in_process_gateway,
        local_stages,
    )

    a = split.artifacts
    stages = local_stages(a)
    recorder, fine = _Inputs(stages[StageName.RERANK]), _Inputs(stages[StageName.FINE_RANK])
    gateway = in_process_gateway(
        a, stages | {StageName.RERANK: recorder, StageName.FINE_RANK: fine}
    )

    def record(i: int) -> tuple[Any, np.ndarray, Any]:
        user = split.user_ids[int(users[i])]
        result = _recommend_request(gateway, user=user, surface=Surface.HOME)
        return recorder.local.last, a.catalog.rows(result.candidates.item_ids), fine.local.last

    print(f"\nthe cascade in process on {len(users)} test users …", flush=True)
    out = fan_out(record, len(users), threads, False, "record")
    return Recorded(
        [o[0] for o in out],
        [o[1] for o in out],
        stages[StageName.RERANK].engine,
        [o[2] for o in out],
        stages[StageName.FINE_RANK].engine,
    )


def replay(
    split: Any,
    recorded: Recorded,
    overrides: RerankOverrides,
    threads: int = 2,
    fine: FineOverrides | None = None,
) -> list[np.ndarray]:
    """Each user's page (catalog rows) re-ranked with ``overrides``, after fine ranking
    again with ``fine`` when given (``FineOverrides()``: the build's own fusion)."""
    from sluice.core.stage import run_stage
    from sluice.eval.served import fan_out

    catalog = split.artifacts.catalog

    def rank(i: int) -> np.ndarray:
        ctx, cands, budget = recorded.inputs[i]
        ctx = dataclasses.replace(ctx, rerank=overrides)
        if fine is not None:
            fine_ctx, fine_cands, fine_budget = recorded.fine_inputs[i]
            ctx = dataclasses.replace(ctx, fine=fine)
            cands = run_stage(
                StageName.FINE_RANK,
                recorded.fine_engine,
                dataclasses.replace(fine_ctx, fine=fine),
                fine_cands,
                fine_budget,
            ).candidates
        page = run_stage(StageName.RERANK, recorded.engine, ctx, cands, budget).candidates
        return catalog.rows(page.item_ids)

    return fan_out(rank, len(recorded.inputs), threads, False, "replay")


def per_user(
    pages: list[np.ndarray], targets: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's HR@k and NDCG@k (one target; the pages already leave the history out)."""
    hr = np.zeros(len(pages))
    ndcg = np.zeros(len(pages))
    for i, (page, target) in enumerate(zip(pages, targets.tolist(), strict=True)):
        hit = np.flatnonzero(page[:k] == target)
        if len(hit):
            hr[i] = 1.0
            ndcg[i] = 1.0 / np.log2(hit[0] + 2.0)
    return hr, ndcg
