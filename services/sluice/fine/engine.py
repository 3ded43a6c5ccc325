"""Fine ranking: the transformer scores each candidate against history and query.

:class:`FineEngine` maps item ids to the model's dense indices, pads to the fixed tensor
shapes Triton batches on, and fuses the model's score with the incoming one. The model
runs behind a :class:`~sluice.fine.backend.RankerBackend` (Triton in production).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from sluice.core.errors import InvalidArgument
from sluice.data.catalog import Catalog
from sluice.domain import Budget, Candidates, RankContext
from sluice.embed.text import TEXT_DIM
from sluice.fine.backend import CANDIDATES_PER_ROW, HISTORY_LEN, RankerBackend, model_id
from sluice.fine.fusion import (
    COARSE_DECIDES_BETA,
    NEEDED_FEATURES,
    FusionWeights,
    fuse,
    fuse_signals,
    signal_matrix,
)

if TYPE_CHECKING:
    from sluice.coarse.engine import FeatureTables


class FineEngine:
    """The fine ranking stage: pure logic around a model backend."""

    def __init__(
        self,
        catalog: Catalog,
        backend: RankerBackend,
        fusion: FusionWeights | None = None,
        arm_backends: Mapping[str, RankerBackend] | None = None,
        tables: FeatureTables | None = None,
    ) -> None:
        """``arm_backends``: the other rankers an experiment arm may ask for, by the
        "name[:version]" it names (``RankContext.fine.model``). ``tables``: the coarse
        feature tables the fusion's signals read (needed when ``fusion.signals`` is set)."""
        self.catalog = catalog
        self.backend = backend
        self.fusion = fusion or FusionWeights()
        self.arm_backends = dict(arm_backends or {})
        self.tables = tables

    def backend_for(self, ctx: RankContext) -> RankerBackend:
        """The ranker this request asks for: an arm's model, else the stage's own."""
        model = ctx.fine.model
        if model is None:
            return self.backend
        found = self.arm_backends.get(model)
        if found is None:
            known = ", ".join(sorted(self.arm_backends)) or "none"
            raise InvalidArgument(
                f"this stage ranks with no model {model!r} (its arm models: {known})",
                field_path="context.fine.model",
            )
        return found

    def tensors(
        self, ctx: RankContext, cands: Candidates
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Padded model inputs; candidates are split over rows of CANDIDATES_PER_ROW."""
        known = self.catalog.build_size  # the model's items; later rows were added live
        hist = self.catalog.rows(ctx.history_item_ids)
        hist = hist[(hist >= 0) & (hist < known)][-HISTORY_LEN:] + 1
        n_rows = max(1, -(-len(cands) // CANDIDATES_PER_ROW))
        history = np.zeros((n_rows, HISTORY_LEN), dtype=np.int64)
        if len(hist):
            history[:, HISTORY_LEN - len(hist) :] = hist
        rows = self.catalog.rows(cands.item_ids)
        dense = np.where(rows < known, rows + 1, 0)  # unknown ids become 0 (padding)
        cand = np.zeros(n_rows * CANDIDATES_PER_ROW, dtype=np.int64)
        cand[: len(dense)] = dense
        query = np.zeros((n_rows, TEXT_DIM), dtype=np.float32)
        has_query = np.zeros((n_rows, 1), dtype=bool)
        if ctx.query_embedding is not None:
            query[:] = ctx.query_embedding
            has_query[:] = True
        return history, cand.reshape(n_rows, CANDIDATES_PER_ROW), query, has_query

    def rank(self, ctx: RankContext, cands: Candidates, budget: Budget) -> Candidates:
        if len(cands) == 0:
            return cands
        backend = self.backend_for(ctx)  # an arm's unknown model is refused either way
        rows = self.catalog.rows(cands.item_ids)
        if not self.runs_model(ctx):
            fused = cands.scores  # the incoming order stands (ties stay in it)
        else:
            fine = self.model_scores(ctx, cands, budget.remaining_s(), backend)
            live = rows >= self.catalog.build_size
            if live.any() and not live.all():  # items added live: unknown to the model
                fine[live] = np.median(fine[~live])
            if self.fuses_signals(ctx):
                assert self.tables is not None
                features = self.tables.features(ctx, cands, NEEDED_FEATURES)
                matrix = signal_matrix(fine, cands.scores, features)
                fused = fuse_signals(matrix, self.fusion.signals)
            else:
                fused = fuse(fine, cands.scores, self.beta(ctx))
        known = rows >= 0
        ranked = cands.with_scores(np.where(known, fused, np.float32(-1e9)))
        return ranked.top(budget.max_candidates)

    def runs_model(self, ctx: RankContext) -> bool:
        """Whether this request's order reads the model. Not for an anonymous request (the
        transformer would read nothing), nor at a beta where the coarse score decides (the
        model could only break ties: a build without behaviour)."""
        if ctx.is_anonymous:
            return False
        return self.fuses_signals(ctx) or self.beta(ctx) < COARSE_DECIDES_BETA

    def beta(self, ctx: RankContext) -> float:
        """The fusion beta of a request that does not fuse signals: an experiment arm's,
        else the build's for its kind."""
        beta = ctx.fine.fusion_beta
        return self.fusion.beta(ctx.is_search) if beta is None else beta

    def fuses_signals(self, ctx: RankContext) -> bool:
        """Whether this request's score fuses several signals rather than a ``beta``: a
        recommendation with no arm's beta, ranked by the model the build's signal weights
        were fitted beside, with the tables the signals read."""
        if not self.fusion.signals or self.tables is None or ctx.is_search:
            return False
        if ctx.fine.fusion_beta is not None:
            return False
        return model_id(self.backend_for(ctx)) == self.fusion.signals_model

    def model_scores(
        self,
        ctx: RankContext,
        cands: Candidates,
        timeout_s: float | None = None,
        backend: RankerBackend | None = None,
    ) -> np.ndarray:
        """The transformer's raw score of each candidate, in input order (by ``backend``, else
        the one the request asks for)."""
        history, cand, query, has_query = self.tensors(ctx, cands)
        backend = backend or self.backend_for(ctx)
        scores = backend.score(history, cand, query, has_query, timeout_s=timeout_s)
        return scores.reshape(-1)[: len(cands)].astype(np.float32)
