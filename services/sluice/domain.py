"""Domain types shared by the stages, free of gRPC and protobuf."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from sluice.data.filters import AttributeFilter


class Source(IntEnum):
    """Recall source; numbers match ``sluice.common.v1.CandidateSource``."""

    UNSPECIFIED = 0
    ANN = 1
    LEXICAL = 2
    CO_OCCURRENCE = 3
    POPULARITY = 4


class RequestKind(IntEnum):
    """What a request is for; numbers match ``sluice.common.v1.RequestKind``."""

    UNSPECIFIED = 0
    SEARCH = 1
    RECOMMEND = 2


class Surface(IntEnum):
    """Recommendation surface; numbers match ``sluice.v1.Surface`` (and the common one)."""

    UNSPECIFIED = 0
    HOME = 1
    SIMILAR_ITEMS = 2


# Reciprocal-rank fusion constant: recall scores an item 1 / (RRF_K + rank) per source.
RRF_K = 60.0


class StageName(IntEnum):
    """Cascade stage; numbers match ``sluice.common.v1.Stage``."""

    UNSPECIFIED = 0
    RECALL = 1
    COARSE_RANK = 2
    FINE_RANK = 3
    RERANK = 4

    @property
    def label(self) -> str:
        """The stage's folder and service name: recall, coarse, fine, rerank."""
        return self.name.lower().removesuffix("_rank")


@dataclass
class Candidates:
    """A candidate set as parallel arrays, best first unless stated otherwise."""

    item_ids: np.ndarray  # int64 [n]
    scores: np.ndarray  # float32 [n]
    sources: np.ndarray  # int8 [n], Source values

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.sources = np.asarray(self.sources, dtype=np.int8)
        if not len(self.item_ids) == len(self.scores) == len(self.sources):
            raise ValueError("candidate arrays differ in length")

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8))

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(self.item_ids[index], self.scores[index], self.sources[index])

    def with_scores(self, scores: np.ndarray) -> Candidates:
        return Candidates(self.item_ids, scores, self.sources)

    def window(self, offset: int, size: int) -> Candidates:
        """Positions ``offset`` to ``offset + size`` (a page), in order."""
        return self.take(np.arange(min(offset, len(self)), min(offset + size, len(self))))

    def top(self, k: int) -> Candidates:
        """The ``k`` best by score, best first (stable for ties)."""
        order = np.argsort(-self.scores, kind="stable")[: max(k, 0)]
        return self.take(order)


# What one request may carry (``sluice.common.v1.RankContext``): every stage enforces it, and
# a rules file that would exceed it on some surface is refused when it is read.
MAX_PINS = 100
MAX_BOOSTS = 100
MAX_PER_BRAND = 100  # the most an arm's per-brand cap may be
MAX_PIN_POSITION = 10_100  # anywhere a page can reach: the gateway's MAX_PAGE_OFFSET + 100


@dataclass(frozen=True)
class Pin:
    """A merchant's pin (``sluice.common.v1.ItemPin``): ``item_id`` at 1-based ``position``
    of the whole ranked list, if the request may show it."""

    item_id: int
    position: int


@dataclass(frozen=True)
class Boost:
    """A merchant's boost (``sluice.common.v1.ItemBoost``): ``weight`` (-1 to 1) added to the
    relevance (scaled to 0..1) of every item of ``brand``, else of ``category``, else of the
    one item ``item_id``."""

    weight: float
    item_id: int = 0
    brand: str = ""
    category: str = ""


MAX_FUSION_BETA = 100.0
# a Triton model an experiment arm may rank with: "name" or "name:version"
MODEL_SPEC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,110}(:[0-9]{1,16})?")


@dataclass(frozen=True)
class FineOverrides:
    """Fine-ranking settings one request asks for in place of the stage's own (an experiment
    arm's); None keeps the stage's setting."""

    fusion_beta: float | None = None  # 0 to MAX_FUSION_BETA
    model: str | None = None  # a Triton ranker "name[:version]" the fine stage lists


@dataclass(frozen=True)
class RerankOverrides:
    """Re-ranking settings one request asks for in place of the stage's own (an experiment
    arm's, :mod:`sluice.experiments`); None keeps the stage's setting."""

    diversity_lambda: float | None = None
    max_per_brand: int | None = None
    exposure_tail_share: float | None = None

    def config_changes(self) -> dict[str, Any]:
        """The fields of ``RerankConfig`` to change."""
        names = {
            "diversity_lambda": "diversity_lambda",
            "max_per_brand": "max_per_brand",
            "exposure_tail_share": "tail_share",
        }
        return {
            config: value
            for name, config in names.items()
            if (value := getattr(self, name)) is not None
        }


@dataclass
class RankContext:
    """What every stage may read about the request (``sluice.common.v1.RankContext``)."""

    kind: RequestKind = RequestKind.UNSPECIFIED
    surface: Surface = Surface.UNSPECIFIED
    query: str = ""
    query_embedding: np.ndarray | None = None  # float32 [384], L2-normalised
    history_item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    context_item_id: int = 0
    filters: tuple[AttributeFilter, ...] = ()
    exclude_item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    build_id: str = ""
    """The build the gateway pinned for this request ("": the stage's current build)."""
    pins: tuple[Pin, ...] = ()
    """The merchant's pins for this request (:mod:`sluice.rules`); re-ranking places them."""
    boosts: tuple[Boost, ...] = ()
    """The merchant's boosts for this request; re-ranking applies them."""
    rerank: RerankOverrides = field(default_factory=RerankOverrides)
    """Re-ranking settings of this request's experiment arms; re-ranking applies them."""
    fine: FineOverrides = field(default_factory=FineOverrides)
    """Fine-ranking settings of this request's experiment arms; fine ranking applies them."""

    @property
    def is_search(self) -> bool:
        return bool(self.query)

    @property
    def is_anonymous(self) -> bool:
        """No query, no history, no anchor item: nothing personal for a model to read.

        Such a request (a newcomer's home page) is served by popularity: the ranking
        stages keep recall's order, which follows live popularity when the state is shared.
        """
        return not self.query and not len(self.history_item_ids) and not self.context_item_id


class Cancellation:
    """Set when the caller goes away; work in flight for it registers how to stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], object]] = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled, hooks, self._hooks = True, self._hooks, []
        for hook in hooks:
            hook()

    def on_cancel(self, hook: Callable[[], object]) -> None:
        """Run ``hook`` when cancelled (at once if already)."""
        with self._lock:
            if not self.cancelled:
                self._hooks.append(hook)
                return
        hook()

    def forget(self, hook: Callable[[], object]) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)


@dataclass(frozen=True)
class Budget:
    """What one stage call may spend: how many candidates to return, by when.

    ``offset`` places a page in the final order (the re-ranking stage returns candidates
    ``offset`` to ``offset + max_candidates``); the other stages return the best
    ``max_candidates`` and ignore it.
    """

    max_candidates: int
    deadline: float | None = None  # time.monotonic() by which to answer; None: no deadline
    offset: int = 0
    cancellation: Cancellation | None = None
    """Set when the caller has gone: a remote stage call in flight is cancelled."""

    @classmethod
    def within(
        cls,
        max_candidates: int,
        timeout_s: float | None,
        offset: int = 0,
        cancellation: Cancellation | None = None,
    ) -> Budget:
        """A budget that ends ``timeout_s`` from now (never, for None)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return cls(max_candidates, deadline, offset, cancellation)

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (never below 0), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@dataclass
class StageReport:
    """What one stage did for one request."""

    stage: StageName
    candidates_in: int = 0
    candidates_out: int = 0
    duration_us: int = 0
    degraded: bool = False
    degraded_reason: str = ""
    build_id: str = ""
    """The build the stage answered from."""
    shards: list[ShardReport] = field(default_factory=list)
    """How each shard answered, for a recall stage over a sharded catalog."""


@dataclass
class ShardReport:
    """How one shard of a sharded recall stage answered one request."""

    index: int
    answered: bool = True
    error: str = ""
    duration_us: int = 0
    candidates_out: int = 0


@dataclass
class Gathered(Candidates):
    """Candidates merged from the shards of a sharded catalog, with how each answered."""

    shards: list[ShardReport] = field(default_factory=list)
