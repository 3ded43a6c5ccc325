"""The gateway's domain logic: run the cascade under the caller's deadline.

The stages sit behind :class:`~sluice.gateway.stages.StageClient`, over gRPC or in
this process, so this logic (validation, deadline split, degradation, pagination) is
the same in both layouts and is tested without gRPC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from cachetools import LRUCache
from prometheus_client import Counter

from sluice.convert import MAX_EXCLUSIONS
from sluice.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DeadlineTooShort,
    InvalidArgument,
    ResourceExhausted,
    SluiceError,
    Unavailable,
)
from sluice.core.stage import Retriever, StageResult, run_stage
from sluice.data.catalog import Catalog
from sluice.data.filters import MAX_FILTERS, AttributeFilter, validate
from sluice.domain import (
    MAX_BOOSTS,
    Boost,
    Budget,
    Cancellation,
    Candidates,
    RankContext,
    RequestKind,
    StageName,
    StageReport,
    Surface,
)
from sluice.events.model import MAX_USER_ID_CHARS
from sluice.experiments import REQUESTS as EXPERIMENT_REQUESTS
from sluice.experiments import Assignment, ExperimentsWatcher
from sluice.gateway.blurbs import Blurbs
from sluice.gateway.catalog import CatalogWriter
from sluice.gateway.explain import Explainer, Reason
from sluice.gateway.refine import Sessions, Turn
from sluice.gateway.shadow import ShadowArms
from sluice.gateway.spelling import Speller
from sluice.gateway.tokens import PageTokens
from sluice.rules import (
    GUARD_DROPPED,
    RequestRules,
    RuleSet,
    RulesWatcher,
    apply_boosts,
    eligible,
    place_pins,
)

if TYPE_CHECKING:
    from sluice.config import GatewaySettings
    from sluice.gateway.stages import StageClient

log = logging.getLogger(__name__)

STAGE_DEGRADED = Counter(
    "sluice_stage_degraded_total",
    "Requests answered without a stage (it was down or out of time), by stage and cause",
    ["stage", "code"],
)

# What a stage call may fail with that the gateway answers around (degrading the page):
# the stage is down, out of time, or refusing work (its admission control).
STAGE_FAILURES = (Unavailable, DeadlineExceeded, ResourceExhausted)

# No page starts beyond this many items: recall never returns more candidates than that.
MAX_PAGE_OFFSET = 10_000

# Share of the remaining deadline each stage may use (recomputed before each call).
STAGE_SHARE: Mapping[StageName, float] = {
    StageName.RECALL: 0.30,
    StageName.COARSE_RANK: 0.15,
    StageName.FINE_RANK: 0.40,
    StageName.RERANK: 0.15,
}


class UserContext(Protocol):
    """What the gateway knows about a user: history and items never to show."""

    def history(self, user_id: str, limit: int) -> np.ndarray: ...

    def suppressed(self, user_id: str) -> np.ndarray: ...


@dataclass(frozen=True)
class GatewayLimits:
    default_deadline_ms: int = 250
    min_deadline_ms: int = 5
    recall_candidates: int = 1000
    coarse_candidates: int = 200
    fine_candidates: int = 200
    max_page_size: int = 100
    max_query_chars: int = 512
    history_len: int = 50

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> GatewayLimits:
        return cls(
            default_deadline_ms=settings.deadline_ms,
            min_deadline_ms=settings.min_deadline_ms,
            recall_candidates=settings.recall_candidates,
            coarse_candidates=settings.coarse_candidates,
            fine_candidates=settings.fine_candidates,
            max_page_size=settings.max_page_size,
            max_query_chars=settings.max_query_chars,
        )


@dataclass
class PageResult:
    """A ranked page with what each stage scored and did."""

    candidates: Candidates
    titles: list[str]
    stage_scores: dict[StageName, np.ndarray]
    reports: list[StageReport]
    next_page_token: str
    total_size: int
    duration_us: int
    build_id: str = ""
    """The build every stage of this page answered from."""
    rules_version: str = ""
    """The merchant rules' version that served the page ("": no rules file)."""
    searched_query: str = ""
    """What was searched: the query after the rules' rewrites."""
    query_blocked: bool = False
    """The query matched the rules' blocked-query list: an empty page, no stage ran."""
    reasons: list[Reason] = field(default_factory=list)
    """Why each page item is there (asked for with ``explain``; else empty)."""
    blurbs: list[str] = field(default_factory=list)
    """Each page item's blurb (asked for with ``blurbs``; else empty)."""
    experiment_arms: tuple[tuple[str, str], ...] = ()
    """(experiment, arm) of each experiment this page was served in."""
    experiments_version: str = ""
    """Version of the experiments file in force ("": no experiments file)."""
    refinement: Turn | None = None
    """What a session's turn searched (a search with a session id); else None."""


@dataclass
class _Request:
    kind: RequestKind
    user_id: str
    query: str = ""
    surface: Surface = Surface.UNSPECIFIED
    context_item_id: int = 0
    filters: tuple[AttributeFilter, ...] = ()
    page_size: int = 10
    page_token: str = ""
    include_age_restricted: bool = False
    explain: bool = False  # how the page is shown, not what it holds: not in the fingerprint
    blurbs: bool = False  # the same
    anchor_item_id: int = 0  # a session's anchor: its vector pulls the query's; off the page
    boosts: tuple[Boost, ...] = ()  # a session's (its topic), after the merchant's
    query_embedding: np.ndarray | None = None  # None: the query's own
    # the user's arms, read once per request from one experiments file (None: not yet)
    assignment: Assignment | None = None
    experiments_version: str = ""

    def fingerprint(self) -> str:
        key = json.dumps(
            [
                self.kind.name.lower(),
                self.user_id,
                self.query,
                int(self.surface),
                self.context_item_id,
                repr(self.filters),
                self.include_age_restricted,
                self.anchor_item_id,
                repr(self.boosts),
            ]
        )
        return hashlib.sha1(key.encode()).hexdigest()[:12]


def _with(
    filters: tuple[AttributeFilter, ...], more: tuple[AttributeFilter, ...], whose: str
) -> tuple[AttributeFilter, ...]:
    """The request's filters and ``more``; INVALID_ARGUMENT on ``filters`` when together
    they exceed what a stage accepts (``whose`` filters take the rest)."""
    if len(filters) + len(more) > MAX_FILTERS:
        raise InvalidArgument(
            f"at most {MAX_FILTERS - len(more)} filters {whose} take the rest",
            field_path="filters",
        )
    return filters + more


def _listed(rules: RuleSet | None, query: str) -> tuple[bool, str]:
    """Whether the merchant's query list blocks ``query``, and the query after its rewrites
    (as given when blocked or without rules)."""
    if rules is None:
        return False, query
    decision = rules.query(query)
    return decision.blocked, query if decision.blocked else decision.query


def _scores_of(cands: Candidates, item_ids: np.ndarray) -> np.ndarray:
    """Each item's score in ``cands`` (NaN where the stage did not return it)."""
    out = np.full(len(item_ids), np.nan, dtype=np.float32)
    if len(cands) == 0 or len(item_ids) == 0:
        return out
    order = np.argsort(cands.item_ids, kind="stable")
    known = cands.item_ids[order]
    pos = np.minimum(np.searchsorted(known, item_ids), len(known) - 1)
    hit = known[pos] == item_ids
    out[hit] = cands.scores[order[pos[hit]]]
    return out


class QueryEncoder:
    """MiniLM query embeddings behind an LRU cache that the handler threads share."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], size: int = 4096) -> None:
        self._encode = encode
        self._cache: LRUCache[str, np.ndarray] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def __call__(self, query: str) -> np.ndarray:
        key = " ".join(query.lower().split())
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        vec = np.asarray(self._encode([key])[0], dtype=np.float32)  # outside the lock
        vec.setflags(write=False)  # shared by every request that asks the same query
        with self._lock:
            self._cache[key] = vec
        return vec


@dataclass
class Gateway:
    """Search and Recommend over the cascade."""

    stages: Mapping[StageName, StageClient]
    catalog: Catalog
    users: UserContext
    encode_query: Callable[[str], np.ndarray]
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    page_tokens: PageTokens = field(
        default_factory=lambda: PageTokens([secrets.token_bytes(32)], MAX_PAGE_OFFSET)
    )
    fallback: Retriever | None = None
    """Recalls while the recall stage is down (``FallbackRecall``); None: such requests fail."""
    build_id: str = ""
    """The build this gateway serves: every stage call is pinned to it (``RankContext``)."""
    rules: RulesWatcher | None = None
    """The merchant's rules file in force (:mod:`sluice.rules`); None: no rules."""
    explainer: Explainer | None = None
    """Gives each page item a reason (:mod:`sluice.gateway.explain`); None: no reasons."""
    blurbs: Blurbs | None = None
    """Gives each page item a blurb (:mod:`sluice.gateway.blurbs`); None: no blurbs."""
    experiments: ExperimentsWatcher | None = None
    """The experiments in force (:mod:`sluice.experiments`); None: no experiments."""
    shadow: ShadowArms | None = None
    """Scores shadow arms off the request path; None: shadow arms are not scored."""
    sessions: Sessions | None = None
    """Search sessions whose turns refine the last result; None: no session_id accepted."""
    catalog_writer: CatalogWriter | None = None
    """Takes UpdateItems for this build's catalog (:mod:`sluice.gateway.catalog`); None: off."""
    speller: Speller | None = None
    """Corrects the words of a query the catalog does not know (:mod:`sluice.gateway.spelling`);
    None: queries are searched as typed."""

    # -- entry points ---------------------------------------------------------------
    def search(
        self,
        *,
        query: str,
        user_id: str = "",
        filters: tuple[AttributeFilter, ...] = (),
        page_size: int,
        page_token: str = "",
        deadline_s: float | None = None,
        cancellation: Cancellation | None = None,
        include_age_restricted: bool = False,
        explain: bool = False,
        blurbs: bool = False,
        session_id: str = "",
    ) -> PageResult:
        """A page of results for ``query``; ``deadline_s`` None: the default budget. Once
        ``cancellation`` is set (the caller went away) the stage call in flight is cancelled
        and no further stage runs. ``include_age_restricted``: the storefront verified the
        shopper's age, so the rules' age-restricted categories may show. ``explain``: give
        each item its reason; ``blurbs``: its blurb. ``session_id``: the query is a turn of
        that search session (:mod:`sluice.gateway.refine`)."""
        if not query.strip():
            raise InvalidArgument("query must not be empty", field_path="query")
        if len(query) > self.limits.max_query_chars:
            raise InvalidArgument(
                f"query is longer than {self.limits.max_query_chars} characters", field_path="query"
            )
        start = time.perf_counter()
        text = query = query.strip()
        turn = None
        if session_id:
            if self.sessions is None:
                raise InvalidArgument("this gateway keeps no sessions", field_path="session_id")
            turn = self.sessions.turn(user_id, session_id, text, paging=bool(page_token))
            query = turn.query
            filters = _with(filters, turn.filters, "in this session: its refinements")
        assignment, version = self._assignment(user_id)
        rules = self._rule_set(assignment)
        # the merchant's query list reads the query as typed, then as corrected: a blocked or
        # rewritten word is often one the catalog never uses, which spelling would change
        # (a session's turns are refinements such as "cheaper", not product words)
        blocked, query = _listed(rules, query)
        speller = self.speller if turn is None else None
        if not blocked and speller is not None and (fixed := speller.correct(query)) != query:
            blocked, query = _listed(rules, fixed)
        if blocked:
            assert rules is not None
            return self._blocked(query, rules.version, start)
        req = _Request(
            RequestKind.SEARCH,
            user_id,
            query=query,
            filters=filters,
            page_size=page_size,
            page_token=page_token,
            include_age_restricted=include_age_restricted,
            explain=explain,
            blurbs=blurbs,
            anchor_item_id=turn.anchor_item_id if turn is not None else 0,
            boosts=turn.boosts if turn is not None else (),
            query_embedding=turn.query_embedding if turn is not None else None,
            assignment=assignment,
            experiments_version=version,
        )
        result = self._run(req, deadline_s, cancellation)
        if turn is not None and self.sessions is not None:
            result.refinement = turn
            if not page_token:  # the turn's first page is what "the second one" points at
                page = result.candidates.item_ids.tolist()
                self.sessions.save(user_id, session_id, text, turn, page)
        return result

    def recommend(
        self,
        *,
        user_id: str,
        surface: Surface | int = Surface.HOME,
        context_item_id: int = 0,
        filters: tuple[AttributeFilter, ...] = (),
        page_size: int,
        page_token: str = "",
        deadline_s: float | None = None,
        cancellation: Cancellation | None = None,
        include_age_restricted: bool = False,
        explain: bool = False,
        blurbs: bool = False,
    ) -> PageResult:
        """A page for a recommendation surface; the other arguments as in search."""
        try:
            kind = Surface(int(surface))
        except ValueError as err:
            raise InvalidArgument(f"unknown surface {surface}", field_path="surface") from err
        if kind is Surface.UNSPECIFIED:  # the storefront API: unset means the home page
            kind = Surface.HOME
        if kind is Surface.SIMILAR_ITEMS and not context_item_id:
            raise InvalidArgument(
                "SURFACE_SIMILAR_ITEMS needs context_item_id", field_path="context_item_id"
            )
        if context_item_id and not self.catalog.contains(context_item_id):
            raise InvalidArgument(
                f"item {context_item_id} is not in the catalog", field_path="context_item_id"
            )
        req = _Request(
            RequestKind.RECOMMEND,
            user_id,
            surface=kind,
            context_item_id=context_item_id,
            filters=filters,
            page_size=page_size,
            page_token=page_token,
            include_age_restricted=include_age_restricted,
            explain=explain,
            blurbs=blurbs,
        )
        return self._run(req, deadline_s, cancellation)

    def _blocked(self, query: str, rules_version: str, start: float) -> PageResult:
        """The empty page of a query the merchant's rules block."""
        return PageResult(
            candidates=Candidates.empty(),
            titles=[],
            stage_scores={},
            reports=[],
            next_page_token="",
            total_size=0,
            duration_us=int((time.perf_counter() - start) * 1e6),
            build_id=self.build_id,
            rules_version=rules_version,
            searched_query=query,
            query_blocked=True,
        )

    # -- the cascade ------------------------------------------------------------------
    def _run(
        self, req: _Request, deadline_s: float | None, cancellation: Cancellation | None
    ) -> PageResult:
        start = time.perf_counter()
        if req.page_size <= 0 or req.page_size > self.limits.max_page_size:
            raise InvalidArgument(
                f"page_size must be between 1 and {self.limits.max_page_size}",
                field_path="page_size",
            )
        if len(req.user_id) > MAX_USER_ID_CHARS:
            raise InvalidArgument(
                f"user_id is longer than {MAX_USER_ID_CHARS} characters", field_path="user_id"
            )
        validate(req.filters)
        offset = self.page_tokens.decode(req.page_token, req.fingerprint())
        budget_s = deadline_s if deadline_s is not None else self.limits.default_deadline_ms / 1000
        if budget_s * 1000 < self.limits.min_deadline_ms:
            raise DeadlineTooShort(
                f"a deadline of {budget_s * 1000:.1f} ms is too short to rank anything; "
                f"allow at least {self.limits.min_deadline_ms} ms"
            )
        deadline = start + budget_s

        history = (
            self.users.history(req.user_id, self.limits.history_len)
            if req.user_id
            else np.zeros(0, np.int64)
        )
        suppressed = self.users.suppressed(req.user_id) if req.user_id else np.zeros(0, np.int64)
        search = req.kind is RequestKind.SEARCH
        exclude = suppressed if search else np.union1d(history, suppressed)
        for anchor in (req.context_item_id, req.anchor_item_id):
            if anchor:
                exclude = np.union1d(exclude, [anchor])
        if req.assignment is None:
            req.assignment, req.experiments_version = self._assignment(req.user_id)
        assignment = req.assignment
        rules = self._rules_for(req, assignment)
        filters = req.filters
        if rules is not None:  # blocked items first: they must survive the cut below
            filters = _with(filters, rules.filters, "on this surface: the merchant's rules")
            exclude = np.concatenate(
                [rules.exclude_item_ids, np.setdiff1d(exclude, rules.exclude_item_ids)]
            )
        exclude = exclude[:MAX_EXCLUSIONS]  # what a stage accepts; beyond it, rerank's window
        for experiment, arm in assignment.arms:
            EXPERIMENT_REQUESTS.labels(experiment, arm).inc()
        ctx = RankContext(
            kind=req.kind,
            surface=req.surface,
            query=req.query,
            query_embedding=(
                req.query_embedding
                if req.query_embedding is not None
                else self.encode_query(req.query)
                if req.query
                else None
            ),
            history_item_ids=history,
            context_item_id=req.context_item_id,
            filters=filters,
            exclude_item_ids=exclude.astype(np.int64),
            build_id=self.build_id,
            pins=rules.pins if rules is not None else (),
            boosts=(rules.boosts + req.boosts)[:MAX_BOOSTS] if rules is not None else req.boosts,
            rerank=assignment.rerank,
            fine=assignment.fine,
        )
        reports: list[StageReport] = []
        scores: dict[StageName, Candidates] = {}

        def budget(stage: StageName, max_candidates: int, offset: int = 0) -> Budget:
            """The stage's share of what is left of the deadline."""
            if cancellation is not None and cancellation.cancelled:
                raise Cancelled(f"the caller went away before {stage.label}")
            remaining = deadline - time.perf_counter()
            later = [s for s in STAGE_SHARE if s >= stage]
            share = STAGE_SHARE[stage] / sum(STAGE_SHARE[s] for s in later)
            if remaining * 1000 < self.limits.min_deadline_ms * share:
                raise DeadlineExceeded(f"deadline reached before {stage.label}")
            timeout_s = remaining * share if stage is not StageName.RERANK else remaining
            return Budget.within(max_candidates, timeout_s, offset, cancellation)

        def call(
            stage: StageName, cands: Candidates | None, max_candidates: int, offset: int = 0
        ) -> StageResult:
            return self._pinned(
                self.stages[stage].call(ctx, cands, budget(stage, max_candidates, offset))
            )

        # recall: without it, the gateway's own fallback (popularity, co-occurrence), if any
        recall_budget = budget(StageName.RECALL, self.limits.recall_candidates)
        try:
            result = self._pinned(self.stages[StageName.RECALL].call(ctx, None, recall_budget))
            report = result.report
        except STAGE_FAILURES as err:
            if self.fallback is None:
                raise
            result = run_stage(StageName.RECALL, self.fallback, ctx, None, recall_budget)
            report = _degraded(StageName.RECALL, result.report.candidates_in, err)
            report.candidates_out = len(result.candidates)
        cands = result.candidates
        reports.append(report)
        scores[StageName.RECALL] = cands

        needed = offset + req.page_size
        keep = max(self.limits.coarse_candidates, needed)
        try:
            result = call(StageName.COARSE_RANK, cands, keep)
            cands, report = result.candidates, result.report
        except STAGE_FAILURES as err:
            cands = cands.top(keep)
            report = _degraded(StageName.COARSE_RANK, len(cands), err)
        reports.append(report)
        scores[StageName.COARSE_RANK] = cands

        try:
            result = call(StageName.FINE_RANK, cands, max(self.limits.fine_candidates, needed))
            cands, report = result.candidates, result.report
            scores[StageName.FINE_RANK] = cands
        except STAGE_FAILURES as err:
            report = _degraded(StageName.FINE_RANK, len(cands), err)
        reports.append(report)

        try:
            result = call(StageName.RERANK, cands, req.page_size, offset)
            page, total, report = result.candidates, result.total_size, result.report
            self._shadow(req, ctx, assignment, cands, offset, page)
        except STAGE_FAILURES as err:  # the gateway applies the merchant's rules itself
            ranked = self._arrange(ctx, cands.top(len(cands)), rules)
            total = len(ranked)
            page = ranked.window(offset, req.page_size)
            report = _degraded(StageName.RERANK, len(cands), err)
        reports.append(report)
        if rules is not None and rules.blocked_rows is not None:
            page = self._guard(page, rules)
        if self.catalog_writer is not None:
            # with live catalog updates, a stage may not have read the latest change yet
            # (for up to catalog_poll_s): this gateway's catalog has every change it
            # acknowledged, so a deleted, sold-out or re-priced item leaves the next page
            page = page.take(np.flatnonzero(eligible(self.catalog, ctx, page.item_ids)))

        rows = self.catalog.rows(page.item_ids)
        titles = [self.catalog.titles[r] if r >= 0 else "" for r in rows.tolist()]
        reasons = (
            self.explainer.explain(ctx, page.item_ids, page.sources)
            if req.explain and self.explainer is not None
            else []
        )
        blurbs = (
            self.blurbs.blurbs(rows, req.query, self._shopper_rows(ctx))
            if req.blurbs and self.blurbs is not None
            else []
        )
        stage_scores = {stage: _scores_of(c, page.item_ids) for stage, c in scores.items()}
        next_token = self.page_tokens.encode(needed, req.fingerprint()) if needed < total else ""
        return PageResult(
            candidates=page,
            titles=titles,
            stage_scores=stage_scores,
            reports=reports,
            next_page_token=next_token,
            total_size=total,
            duration_us=int((time.perf_counter() - start) * 1e6),
            build_id=self.build_id,
            rules_version=rules.version if rules is not None else "",
            searched_query=req.query,
            reasons=reasons,
            blurbs=blurbs,
            experiment_arms=assignment.arms,
            experiments_version=req.experiments_version,
        )

    def _shadow(
        self,
        req: _Request,
        ctx: RankContext,
        assignment: Assignment,
        cands: Candidates,
        offset: int,
        page: Candidates,
    ) -> None:
        """Hand each shadow arm of this request to the background scorer."""
        if self.shadow is None or not assignment.shadows:
            return
        served = {
            "kind": req.kind.name.lower(),
            "user_id": req.user_id,
            "query": req.query,
            "surface": int(req.surface),
            "offset": offset,
            "build_id": self.build_id,
            "arms": dict(assignment.arms),
            "item_ids": page.item_ids.tolist(),
        }
        for experiment, arm, settings in assignment.shadows:
            changes = {k: v for k, v in vars(settings).items() if v is not None}
            shadow_ctx = dataclasses.replace(ctx, rerank=dataclasses.replace(ctx.rerank, **changes))
            self.shadow.submit(
                self.stages[StageName.RERANK],
                experiment,
                arm,
                shadow_ctx,
                cands,
                req.page_size,
                offset,
                served,
            )

    def _shopper_rows(self, ctx: RankContext) -> np.ndarray:
        """What the shopper looked at: the history, then the anchor item (catalog rows)."""
        ids = ctx.history_item_ids
        if ctx.context_item_id:
            ids = np.append(ids, ctx.context_item_id)
        rows = self.catalog.rows(ids)
        return rows[rows >= 0]

    # -- the merchant's rules --------------------------------------------------------
    def _assignment(self, user_id: str) -> tuple[Assignment, str]:
        """The user's arms, and the version of the experiments file they come from."""
        if self.experiments is None:
            return Assignment(), ""
        experiments = self.experiments.current  # one file for the whole request
        return experiments.assign(user_id), experiments.version

    def _rule_set(self, assignment: Assignment) -> RuleSet | None:
        """The rules for this request: the user's experiment arm's, else the rules file's."""
        if assignment.rules is not None:
            return assignment.rules
        return self.rules.current if self.rules is not None else None

    def _rules_for(self, req: _Request, assignment: Assignment) -> RequestRules | None:
        rules = self._rule_set(assignment)
        if rules is None:
            return None
        return rules.for_request(
            self.catalog, req.kind, req.surface, req.query, req.include_age_restricted
        )

    def _arrange(
        self, ctx: RankContext, ranked: Candidates, rules: RequestRules | None
    ) -> Candidates:
        """What re-ranking does with the rules, for when it cannot: drop what the request
        may not show, apply the boosts, place the pins."""
        if rules is None:
            return ranked
        ranked = ranked.take(np.flatnonzero(eligible(self.catalog, ctx, ranked.item_ids)))
        ranked = apply_boosts(self.catalog, ranked, rules.boosts)
        return place_pins(ranked, rules.pins, lambda ids: eligible(self.catalog, ctx, ids))

    def _guard(self, page: Candidates, rules: RequestRules) -> Candidates:
        """The page without anything the rules block: the last line, after every stage."""
        allowed = rules.allowed(self.catalog, page.item_ids)
        if allowed.all():
            return page
        GUARD_DROPPED.inc(int((~allowed).sum()))
        log.error(
            "a stage returned items the rules block; dropped from the page",
            extra={"items": page.item_ids[~allowed].tolist(), "rules_version": rules.version},
        )
        return page.take(np.flatnonzero(allowed))

    def _pinned(self, result: StageResult) -> StageResult:
        """A stage's answer, refused (the stage degrades) if it came from another build."""
        answered = result.report.build_id
        if self.build_id and answered and answered != self.build_id:
            raise Unavailable(
                f"{result.report.stage.label} answered from build {answered!r}, "
                f"not {self.build_id!r}"
            )
        return result


def _degraded(stage: StageName, n: int, err: SluiceError) -> StageReport:
    STAGE_DEGRADED.labels(stage.label, err.code.name).inc()
    log.warning("stage degraded", extra={"stage_name": stage.name, "error": err.message})
    return StageReport(stage, n, n, 0, degraded=True, degraded_reason=err.message)
