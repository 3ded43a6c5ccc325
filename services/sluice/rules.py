"""Merchant rules: blocked items, brands and categories, age-restricted categories, a query
safety list, pins and boosts, per surface, from a versioned file swapped without a restart.

The gateway owns the rules file (``SLUICE_GATEWAY_RULES_FILE``) and turns it, per request,
into what the stages already honour:
- blocks and hidden age-restricted categories become ``not_brand`` / ``not_category``
  filters and excluded item ids in the :class:`~sluice.domain.RankContext`, so recall (and
  the gateway's own recall fallback) never retrieves them and re-ranking drops them again;
- pins and boosts travel in the context too, and re-ranking applies them
  (:func:`apply_boosts`, :func:`place_pins`);
- the query list is the gateway's alone: a blocked query gets an empty page and no stage
  runs; a rewrite changes what is searched.
When re-ranking is down or out of time, the gateway applies boosts and pins itself, and on
every page it drops whatever the rules block (a guard that should never fire:
``sluice_rules_guard_dropped_total``). See ``docs/features.md``.

The file is JSON::

    {"version": "2026-12-04.1",
     "blocked": {"item_ids": [17], "brands": ["Acme"], "categories": ["Vapes"]},
     "surfaces": {"similar_items": {"brands": ["Rival"]}},
     "age_restricted_categories": ["Wine"],
     "queries": {"blocked": ["fake id"], "rewrites": {"tshirt": "t shirt"}},
     "pins": [{"item_id": 42, "position": 1, "surfaces": ["home"]}],
     "boosts": [{"brand": "House", "weight": 0.2}]}
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from sluice.core.watch import WatchedFile, read_json_file, write_json_file
from sluice.data.catalog import Catalog
from sluice.data.filters import MAX_FILTER_VALUES, AttributeFilter, compile_filters
from sluice.domain import (
    MAX_BOOSTS,
    MAX_PIN_POSITION,
    MAX_PINS,
    Boost,
    Candidates,
    Pin,
    RankContext,
    RequestKind,
    Surface,
)

log = logging.getLogger(__name__)

RELOADS = Counter(
    "sluice_rules_reloads_total", "Rules file loads, by result (ok, error)", ["result"]
)
GUARD_DROPPED = Counter(
    "sluice_rules_guard_dropped_total",
    "Items the gateway dropped from a page because the rules block them (should stay 0)",
)
LOADED_AT = Gauge("sluice_rules_loaded_timestamp_seconds", "When the rules in force were loaded")

MAX_BLOCKED_ITEMS = 5_000  # half the context's exclusions: room for the user's own

SurfaceName = Literal["search", "home", "similar_items"]
SURFACES: tuple[SurfaceName, ...] = ("search", "home", "similar_items")
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Phrase = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"\w")]
_TOKEN = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens: what query rules match on."""
    return _TOKEN.findall(text.lower())


def surface_name(kind: RequestKind, surface: Surface) -> SurfaceName:
    if kind is RequestKind.SEARCH:
        return "search"
    return "similar_items" if surface is Surface.SIMILAR_ITEMS else "home"


# -- the file -----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Blocks(_Strict):
    """Items never shown."""

    item_ids: list[int] = Field(default_factory=list, max_length=MAX_BLOCKED_ITEMS)
    brands: list[Name] = Field(default_factory=list, max_length=256)
    categories: list[Name] = Field(default_factory=list, max_length=256)


class QueryRules(_Strict):
    """Phrases match whole words in order, in any case ("fake id" matches "Fake ID card")."""

    blocked: list[Phrase] = Field(default_factory=list)
    rewrites: dict[Phrase, Phrase] = Field(default_factory=dict)


class PinRule(_Strict):
    item_id: int
    position: int = Field(ge=1, le=MAX_PIN_POSITION)
    surfaces: list[SurfaceName] = Field(default_factory=lambda: list(SURFACES), min_length=1)
    queries: list[Phrase] = Field(
        default_factory=list, description="search only: pin for these queries (all if empty)"
    )


class BoostRule(_Strict):
    item_id: int | None = None
    brand: Name | None = None
    category: Name | None = None
    weight: float = Field(ge=-1.0, le=1.0, allow_inf_nan=False)
    surfaces: list[SurfaceName] = Field(default_factory=lambda: list(SURFACES), min_length=1)

    @model_validator(mode="after")
    def _one_target(self) -> BoostRule:
        if sum(t is not None for t in (self.item_id, self.brand, self.category)) != 1:
            raise ValueError("a boost names exactly one of item_id, brand, category")
        return self


class RulesFile(_Strict):
    version: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    blocked: Blocks = Field(default_factory=Blocks)
    surfaces: dict[SurfaceName, Blocks] = Field(
        default_factory=dict, description="blocks for one surface, on top of `blocked`"
    )
    age_restricted_categories: list[Name] = Field(default_factory=list, max_length=256)
    queries: QueryRules = Field(default_factory=QueryRules)
    pins: list[PinRule] = Field(default_factory=list, max_length=1000)
    boosts: list[BoostRule] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _fit_a_request(self) -> RulesFile:
        for surface in SURFACES:
            pins = [p for p in self.pins if surface in p.surfaces]
            boosts = [b for b in self.boosts if surface in b.surfaces]
            if len(pins) > MAX_PINS or len(boosts) > MAX_BOOSTS:
                raise ValueError(
                    f"at most {MAX_PINS} pins and {MAX_BOOSTS} boosts per surface ({surface})"
                )
            blocked = set(self.blocked.item_ids) | set(
                self.surfaces.get(surface, Blocks()).item_ids
            )
            if len(blocked) > MAX_BLOCKED_ITEMS:
                raise ValueError(f"at most {MAX_BLOCKED_ITEMS} blocked items per surface")
            extra = self.surfaces.get(surface, Blocks())
            brands = set(self.blocked.brands) | set(extra.brands)
            categories = set(self.blocked.categories) | set(extra.categories)
            categories |= set(self.age_restricted_categories)
            if max(len(brands), len(categories)) > MAX_FILTER_VALUES:
                raise ValueError(
                    f"at most {MAX_FILTER_VALUES} blocked brands, and as many blocked or "
                    f"age-restricted categories, per surface ({surface})"
                )
        return self


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the field."""


def read_rules(path: Path) -> RulesFile:
    return read_json_file(path, RulesFile, "rules", RulesError)


# -- what one request gets ----------------------------------------------------------------
@dataclass(frozen=True)
class QueryDecision:
    blocked: bool
    query: str
    """What to search: the query with the rewrites applied (unchanged if none did)."""


@dataclass(frozen=True)
class RequestRules:
    """The rules of one request, in the context's terms."""

    version: str
    filters: tuple[AttributeFilter, ...]
    exclude_item_ids: np.ndarray
    pins: tuple[Pin, ...]
    boosts: tuple[Boost, ...]
    blocked_rows: np.ndarray | None
    """Catalog rows the rules block for this request (None: nothing blocked)."""

    def allowed(self, catalog: Catalog, item_ids: np.ndarray) -> np.ndarray:
        """Which of ``item_ids`` the rules let through (ids not in the catalog do not pass)."""
        rows = catalog.rows(item_ids)
        ok = rows >= 0
        if self.blocked_rows is not None:
            ok[ok] = ~self.blocked_rows[rows[ok]]
        return ok


class RuleSet:
    """A parsed rules file; :meth:`for_request` compiles it for one request."""

    def __init__(self, spec: RulesFile) -> None:
        self.spec = spec
        self.version = spec.version
        self._blocked_queries = [tokens(p) for p in spec.queries.blocked]
        self._rewrites = [(tokens(a), tokens(b)) for a, b in spec.queries.rewrites.items()]
        self._masks: dict[tuple[int, int, SurfaceName, bool], np.ndarray | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def empty(cls) -> RuleSet:
        return cls(RulesFile(version="none"))

    def query(self, query: str) -> QueryDecision:
        words = tokens(query)
        if any(_find(words, p) >= 0 for p in self._blocked_queries):
            return QueryDecision(True, query)
        changed = False
        for old, new in self._rewrites:
            at = _find(words, old)
            if at >= 0:
                words = words[:at] + new + words[at + len(old) :]
                changed = True
        if changed and any(_find(words, p) >= 0 for p in self._blocked_queries):
            return QueryDecision(True, query)
        return QueryDecision(False, " ".join(words) if changed else query)

    def for_request(
        self,
        catalog: Catalog,
        kind: RequestKind,
        surface: Surface,
        query: str = "",
        include_age_restricted: bool = False,
    ) -> RequestRules:
        name = surface_name(kind, surface)
        blocks = [self.spec.blocked, self.spec.surfaces.get(name, Blocks())]
        brands = sorted({b for bl in blocks for b in bl.brands})
        categories = {c for bl in blocks for c in bl.categories}
        if not include_age_restricted:
            categories |= set(self.spec.age_restricted_categories)
        filters = []
        if brands:
            filters.append(AttributeFilter("brand", none_of=tuple(brands)))
        if categories:
            filters.append(AttributeFilter("category", none_of=tuple(sorted(categories))))
        items = np.unique(np.asarray([i for bl in blocks for i in bl.item_ids], np.int64))
        words = tokens(query)
        pins = tuple(
            Pin(p.item_id, p.position)
            for p in self.spec.pins
            if name in p.surfaces
            and (name != "search" or not p.queries or any(tokens(q) == words for q in p.queries))
        )
        boosts = tuple(
            Boost(b.weight, item_id=b.item_id or 0, brand=b.brand or "", category=b.category or "")
            for b in self.spec.boosts
            if name in b.surfaces
        )
        return RequestRules(
            self.version,
            tuple(filters),
            items,
            pins,
            boosts,
            self._blocked_rows(catalog, name, include_age_restricted, tuple(filters), items),
        )

    def _blocked_rows(
        self,
        catalog: Catalog,
        name: SurfaceName,
        include_age_restricted: bool,
        filters: tuple[AttributeFilter, ...],
        items: np.ndarray,
    ) -> np.ndarray | None:
        key = (id(catalog), catalog.version, name, include_age_restricted)
        with self._lock:
            if key in self._masks:
                return self._masks[key]
        if not filters and not len(items):
            mask = None
        else:
            allowed = compile_filters(catalog, filters).mask
            mask = ~allowed if allowed is not None else catalog.hidden.copy()
            rows = catalog.rows(items)
            mask[rows[rows >= 0]] = True
            mask.setflags(write=False)
        with self._lock:
            if len(self._masks) > 64:  # catalogs of builds swapped out
                self._masks.clear()
            self._masks[key] = mask
        return mask


def _find(words: Sequence[str], phrase: Sequence[str]) -> int:
    """Where ``phrase`` starts in ``words`` as whole consecutive words; -1 if it does not."""
    n = len(phrase)
    if n == 0:
        return -1
    for i in range(len(words) - n + 1):
        if list(words[i : i + n]) == list(phrase):
            return i
    return -1


# -- boosts and pins (re-ranking, and the gateway when re-ranking is down) ---------------
def eligible(
    catalog: Catalog, ctx: RankContext, item_ids: np.ndarray, require_in_stock: bool = True
) -> np.ndarray:
    """Which items the request may show: in the catalog, within its filters (the rules'
    too), in stock, not excluded."""
    rows = catalog.rows(item_ids)
    keep = compile_filters(catalog, ctx.filters).allows_rows(rows)
    if require_in_stock:
        keep &= np.where(rows >= 0, catalog.in_stock[np.maximum(rows, 0)], False)
    if len(ctx.exclude_item_ids):
        keep &= ~np.isin(item_ids, ctx.exclude_item_ids)
    return keep


def boost_weights(catalog: Catalog, item_ids: np.ndarray, boosts: Sequence[Boost]) -> np.ndarray:
    """Each item's summed boost weight, clipped to -1..1."""
    out = np.zeros(len(item_ids), np.float64)
    if not boosts or not len(item_ids):
        return out
    rows = catalog.rows(item_ids)
    known = rows >= 0
    safe = np.maximum(rows, 0)
    for b in boosts:  # a brand, else a category, else one item (whose id may be 0)
        if b.brand:
            code = catalog.brands.index(b.brand) if b.brand in catalog.brands else -1
            hit = known & (catalog.brand_codes[safe] == code)
        elif b.category:
            code = catalog.categories.index(b.category) if b.category in catalog.categories else -1
            hit = known & (catalog.category_codes[safe] == code)
        else:
            hit = item_ids == b.item_id
        out[hit] += b.weight
    return np.clip(out, -1.0, 1.0)


def apply_boosts(catalog: Catalog, cands: Candidates, boosts: Sequence[Boost]) -> Candidates:
    """Candidates re-scored as relevance scaled to 0..1 plus their boost, best first."""
    if not boosts or not len(cands):
        return cands
    scores = cands.scores.astype(np.float64)
    finite = np.isfinite(scores)
    lo, hi = (scores[finite].min(), scores[finite].max()) if finite.any() else (0.0, 0.0)
    rel = np.where(finite, (scores - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
    boosted = (rel + boost_weights(catalog, cands.item_ids, boosts)).astype(np.float32)
    return cands.with_scores(boosted).top(len(cands))


def place_pins(
    cands: Candidates, pins: Sequence[Pin], allows: Callable[[np.ndarray], np.ndarray]
) -> Candidates:
    """``cands`` (in final order) with each pinned item moved to its position, or inserted
    there if it is not among them but ``allows`` it. A pinned item takes the score of the
    item it displaces, and source UNSPECIFIED if it was not recalled."""
    if not pins:
        return cands
    first: dict[int, int] = {}
    for p in sorted(pins, key=lambda p: p.position):
        first.setdefault(p.item_id, p.position)
    pinned = np.fromiter(first, np.int64, len(first))
    present = np.isin(pinned, cands.item_ids)
    absent = pinned[~present]
    ok = np.ones(len(pinned), bool)
    if len(absent):
        ok[~present] = allows(absent)
    ids = cands.item_ids.tolist()
    scores = cands.scores.tolist()
    sources = cands.sources.tolist()
    where = {item: i for i, item in enumerate(ids)}
    keep = [True] * len(ids)
    moved: dict[int, tuple[float, int]] = {}
    for item in pinned[ok].tolist():
        i = where.get(item)
        if i is not None:
            keep[i] = False
            moved[item] = (scores[i], sources[i])
    rest = [(ids[i], scores[i], sources[i]) for i in range(len(ids)) if keep[i]]
    for item in pinned[ok].tolist():
        at = min(first[item] - 1, len(rest))
        displaced = rest[at][1] if at < len(rest) else (rest[-1][1] if rest else 0.0)
        source = moved.get(item, (0.0, 0))[1]
        rest.insert(at, (item, displaced, source))
    return Candidates(
        np.asarray([r[0] for r in rest], np.int64),
        np.asarray([r[1] for r in rest], np.float32),
        np.asarray([r[2] for r in rest], np.int8),
    )


# -- the file, watched --------------------------------------------------------------------
class RulesWatcher(WatchedFile[RuleSet]):
    """The rules in force, re-read when the file changes (:mod:`sluice.core.watch`)."""

    def __init__(self, path: Path, poll_s: float = 1.0) -> None:
        super().__init__(
            path,
            lambda p: RuleSet(read_rules(p)),
            name="rules",
            reloads=RELOADS,
            loaded_at=LOADED_AT,
            version=lambda rules: rules.version,
            poll_s=poll_s,
        )


def write_rules(path: Path, spec: dict[str, object]) -> None:
    write_json_file(path, spec, RulesFile)
