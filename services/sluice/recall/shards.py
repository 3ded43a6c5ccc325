"""A sharded catalog: recall over contiguous row ranges, scattered to and gathered from.

A build's ``shards/`` folder (``sluice build --shards N``, or ``sluice shard`` for a build
that exists) splits the catalog's rows into ``N`` contiguous ranges, listed in its manifest::

    shards/manifest.json       {"count": N, "ranges": [[0, r1], [r1, r2], ...], "index_kind": ...}
    shards/<i>/catalog.npz, catalog_text.json   the range's items
    shards/<i>/behaviour.faiss, text.faiss      ANN over the range's vectors
    shards/<i>/lexical/                         BM25 over the range, with the whole catalog's
                                                term statistics (scores as in one index)
    shards/<i>/cooc.npz                         for every catalog row (a seed), the rows of the
                                                range among its top co-occurring items

A **shard** (``SLUICE_RECALL_SHARD=i``) serves ``RetrieveShardCandidates``: every source's
best candidates among its items, unmerged (:class:`ShardEngine`). It reads the seeds of a
request (history, anchor) from the whole catalog: the id column and the behaviour vectors,
memory-mapped so that shards on one machine share their pages.

A **front** (``SLUICE_RECALL_SHARD_ADDRS``) is the recall stage the gateway calls: it asks
every shard, within the recall budget, and merges their lists exactly as one recall engine
merges its sources (:class:`ShardedRecall`). Each source's lists are gathered in one order,
score descending and ties in catalog row order, the order one engine uses
(:func:`~sluice.recall.sources.best_first`): with flat indexes, N shards answer exactly what
one does. A shard that fails or misses the budget leaves its items out of the page, which is
flagged per shard (:class:`~sluice.domain.ShardReport`); only when none answers does the
stage fail (and the gateway serves its recall fallback).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sluice.artifacts import Artifacts
from sluice.core.errors import DeadlineExceeded, InvalidArgument, SluiceError, Unavailable
from sluice.core.stage import StageResult
from sluice.data.catalog import Catalog, RowIndex
from sluice.domain import (
    Budget,
    Cancellation,
    Candidates,
    Gathered,
    RankContext,
    ShardReport,
    Source,
)
from sluice.recall.engine import PopularitySource, RecallAssets, RecallConfig, RecallEngine
from sluice.recall.sources import StaticPopularity, first_allowed, merge

if TYPE_CHECKING:
    from sluice.recall.live_popularity import LivePopularity

log = logging.getLogger(__name__)

MISSED_BUDGET = "missed the recall budget"  # a shard report's error when time ran out

SHARDS_DIR = "shards"
SHARD_MANIFEST = "manifest.json"
SOURCE_LISTS = 3
"""A request runs at most three sources: a shard's answer of ``max_candidates`` holds at most
``max_candidates // SOURCE_LISTS`` per source, so a front asks for that many times its budget."""

SEARCH_ORDER = (Source.LEXICAL, Source.ANN, Source.POPULARITY)
RECOMMEND_ORDER = (Source.ANN, Source.CO_OCCURRENCE, Source.POPULARITY)
"""The order in which :meth:`RecallEngine.source_lists` makes the lists (the merge's fusion
adds them up in this order, so the front keeps it)."""


@dataclass(frozen=True)
class ShardManifest:
    """How a build's catalog is split: contiguous row ranges, one per shard."""

    ranges: tuple[tuple[int, int], ...]
    index_kind: str = "auto"

    @property
    def count(self) -> int:
        return len(self.ranges)

    @property
    def num_items(self) -> int:
        return self.ranges[-1][1] if self.ranges else 0

    @classmethod
    def even(cls, num_items: int, count: int, index_kind: str = "auto") -> ShardManifest:
        """``count`` ranges of (nearly) equal size over ``num_items`` rows."""
        if count < 1 or count > max(1, num_items):
            raise ValueError(f"cannot split {num_items} items into {count} shards")
        bounds = [round(i * num_items / count) for i in range(count + 1)]
        return cls(tuple(itertools.pairwise(bounds)), index_kind)

    @staticmethod
    def folder(root: Path) -> Path:
        return root / SHARDS_DIR

    @classmethod
    def load(cls, root: Path) -> ShardManifest:
        """The manifest of the build at ``root``; FileNotFoundError if it has no shards."""
        path = cls.folder(root) / SHARD_MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{root} has no sharded catalog: run `sluice shard` on it")
        data = json.loads(path.read_text())
        ranges = tuple((int(a), int(b)) for a, b in data["ranges"])
        return cls(ranges, str(data.get("index_kind", "auto")))

    def save(self, root: Path) -> None:
        """Write the manifest last and atomically: shard folders it names are complete."""
        folder = self.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"count": self.count, "ranges": self.ranges, "index_kind": self.index_kind}
        tmp = folder / f".{SHARD_MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(folder / SHARD_MANIFEST)

    def shard_dir(self, root: Path, index: int) -> Path:
        if not 0 <= index < self.count:
            raise ValueError(f"shard {index} does not exist: the build has {self.count} shards")
        return self.folder(root) / str(index)


class RangePopularity:
    """A popularity source over the whole catalog, seen from the shard of rows
    ``start:stop`` (the same scores, so shards' lists merge by score)."""

    def __init__(self, inner: LivePopularity, start: int, stop: int) -> None:
        self.inner, self.start, self.stop = inner, start, stop
        self._cached: tuple[np.ndarray, np.ndarray] | None = None  # (whole order, shard order)

    def _order(self) -> np.ndarray:
        order = self.inner.snapshot.order
        cached = self._cached
        if cached is None or cached[0] is not order:  # once per refresh of the inner order
            mine = order[(order >= self.start) & (order < self.stop)] - self.start
            cached = self._cached = (order, mine)
        return cached[1]

    def top_rows(self, k: int, allowed: np.ndarray | None) -> np.ndarray:
        return first_allowed(self._order(), k, allowed)

    def scores_of(self, rows: np.ndarray) -> np.ndarray:
        return self.inner.scores_of(np.asarray(rows) + self.start)


def shard_assets(
    artifacts: Artifacts,
    index: int,
    popularity: LivePopularity | None = None,
    use_gpu: bool | None = None,
) -> RecallAssets:
    """Recall's assets for shard ``index`` of the build ``artifacts``; ``popularity`` (over
    the whole catalog, e.g. live) is narrowed to the shard's rows."""
    from sluice.recall.ann_index import AnnIndex
    from sluice.recall.lexical import LexicalIndex

    manifest = ShardManifest.load(artifacts.root)
    folder = manifest.shard_dir(artifacts.root, index)
    start, stop = manifest.ranges[index]
    whole_ids = np.load(artifacts.root / "catalog.npz")["item_ids"]
    if len(whole_ids) != manifest.num_items:
        raise ValueError(f"{folder} was cut from another catalog than {artifacts.root}'s")
    cooc = np.load(folder / "cooc.npz")
    pop: PopularitySource = (
        StaticPopularity(artifacts.popularity[start:stop])
        if popularity is None
        else RangePopularity(popularity, start, stop)
    )
    return RecallAssets(
        catalog=Catalog.load(folder),
        behaviour_vectors=np.load(artifacts.root / "behaviour_vectors.npy", mmap_mode="r"),
        behaviour_index=AnnIndex.load(folder / "behaviour.faiss", use_gpu=use_gpu),
        text_index=AnnIndex.load(folder / "text.faiss", use_gpu=use_gpu),
        lexical=LexicalIndex.load(folder / "lexical"),
        cooc_rows=cooc["top_rows"],
        cooc_scores=cooc["top_scores"],
        popularity=pop,
        seeds=RowIndex(whole_ids),
    )


class ShardEngine:
    """A shard's recall stage: each source's best candidates among its items, unmerged.

    Its answer is the lists one after another (``sources`` names each candidate's list);
    within a list best first, ties in row order. A shard's rows are a contiguous range of
    the catalog's, so that order is the catalog's order too."""

    def __init__(self, engine: RecallEngine) -> None:
        self.engine = engine

    @property
    def catalog_size(self) -> int:
        return self.engine.catalog_size

    def retrieve(self, ctx: RankContext, budget: Budget) -> Candidates:
        per_source = max(1, budget.max_candidates // SOURCE_LISTS)
        lists = self.engine.source_lists(ctx, per_source)
        item_ids = self.engine.assets.catalog.item_ids
        ids, scores, sources = [], [], []
        for source, (rows, row_scores) in lists.items():
            ids.append(item_ids[rows])
            scores.append(row_scores)
            sources.append(np.full(len(rows), int(source), np.int8))
        if not ids:
            return Candidates.empty()
        return Candidates(np.concatenate(ids), np.concatenate(scores), np.concatenate(sources))


class ShardClient(Protocol):
    """One shard as the front calls it (a :class:`~sluice.gateway.stages.StageClient`)."""

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult: ...


class ShardedRecall:
    """The recall front: every shard asked within the budget; lists merged.

    ``shards`` answer ``RetrieveShardCandidates`` (over gRPC, or shard engines in this
    process), in shard order. Of the budget, ``reserve_share`` (at least ``reserve_s``) is
    kept for the merge and the way back: a shard that has not answered by then is left out.
    Remote shards are asked at once (``parallel``); shards in this process are asked one after
    another in the request's own thread: their work is CPU (FAISS, numpy), and threads only
    add hand-offs between the cores the other processes need."""

    def __init__(
        self,
        shards: Sequence[ShardClient],
        catalog_size: int,
        config: RecallConfig | None = None,
        reserve_s: float = 0.005,
        reserve_share: float = 0.25,
        closers: list[Callable[[], None]] | None = None,
        parallel: bool = True,
    ) -> None:
        if not shards:
            raise ValueError("a sharded recall needs at least one shard")
        self.shards = list(shards)
        self.parallel = parallel
        self.config = config or RecallConfig()
        self.reserve_s = reserve_s
        self.reserve_share = reserve_share
        self._catalog_size = catalog_size
        self._pool = cf.ThreadPoolExecutor(
            max_workers=8 * len(self.shards), thread_name_prefix="recall-shard"
        )
        if closers is not None:
            closers.append(lambda: self._pool.shutdown(wait=False, cancel_futures=True))

    @property
    def catalog_size(self) -> int:
        return self._catalog_size

    def retrieve(self, ctx: RankContext, budget: Budget) -> Gathered:
        k = budget.max_candidates
        cancel = Cancellation()  # the shards still running when the front stops waiting
        if budget.cancellation is not None:
            budget.cancellation.on_cancel(cancel.cancel)
        remaining = budget.remaining_s()
        wait_s = None
        if remaining is not None:
            wait_s = max(0.0, remaining - max(self.reserve_s, self.reserve_share * remaining))
        deadline = None if wait_s is None else time.monotonic() + wait_s
        ask = Budget(k * SOURCE_LISTS, deadline, cancellation=cancel)
        t0 = time.perf_counter()
        try:
            if self.parallel:
                futures = [self._pool.submit(_timed, s.call, ctx, ask) for s in self.shards]
                cf.wait(futures, timeout=wait_s)
                reports, answers = self._collect(futures, t0)
            else:
                reports, answers = self._in_turn(ctx, ask, deadline, t0)
        finally:  # what still runs for this request stops
            cancel.cancel()
            if budget.cancellation is not None:
                budget.cancellation.forget(cancel.cancel)
        if not answers:
            raise Unavailable(
                "no recall shard answered: " + "; ".join(f"{r.index}: {r.error}" for r in reports)
            )
        merged = gather(answers, ctx, k, self.config)
        return Gathered(merged.item_ids, merged.scores, merged.sources, shards=reports)

    def _in_turn(
        self, ctx: RankContext, ask: Budget, deadline: float | None, t0: float
    ) -> tuple[list[ShardReport], list[Candidates]]:
        """Each shard in turn, in this thread; those left when the wait is over are missed."""

        def turns() -> Iterator[Callable[[], tuple[Candidates, int]] | None]:
            for shard in self.shards:  # lazily: the time is read as each turn comes
                if deadline is not None and time.monotonic() >= deadline:
                    yield None
                else:
                    yield functools.partial(_timed, shard.call, ctx, ask)

        return _gathered(turns(), t0)

    @staticmethod
    def _collect(
        futures: list[cf.Future[tuple[Candidates, int]]], t0: float
    ) -> tuple[list[ShardReport], list[Candidates]]:
        """Each shard's report, and the answers of those that answered in time."""
        return _gathered((f.result if f.done() else None for f in futures), t0)


def _gathered(
    outcomes: Iterable[Callable[[], tuple[Candidates, int]] | None], t0: float
) -> tuple[list[ShardReport], list[Candidates]]:
    """Reports and answers from each shard's outcome, in shard order: None when the front
    stopped waiting before it, else what gives its answer (or raises its error)."""
    reports: list[ShardReport] = []
    answers: list[Candidates] = []
    for index, outcome in enumerate(outcomes):
        try:
            if outcome is None:  # the front stopped waiting for it
                raise DeadlineExceeded(MISSED_BUDGET)
            cands, us = outcome()
        except InvalidArgument:  # the request's fault: every shard says the same
            raise
        except DeadlineExceeded:
            # the shard's call carries the deadline the front waits for: whichever of the
            # two noticed it first, the shard missed the recall budget
            us = int((time.perf_counter() - t0) * 1e6)
            reports.append(ShardReport(index, False, MISSED_BUDGET, us))
            continue
        except SluiceError as err:
            reports.append(ShardReport(index, False, f"{err.code.name}: {err.message}"))
            continue
        reports.append(ShardReport(index, True, "", us, len(cands)))
        answers.append(cands)
    return reports, answers


def _timed(
    call: Callable[[RankContext, Candidates | None, Budget], StageResult],
    ctx: RankContext,
    budget: Budget,
) -> tuple[Candidates, int]:
    t0 = time.perf_counter()
    result = call(ctx, None, budget)
    return result.candidates, int((time.perf_counter() - t0) * 1e6)


def gather(
    answers: Sequence[Candidates], ctx: RankContext, k: int, config: RecallConfig
) -> Candidates:
    """The shards' answers (in shard order) merged as one engine merges its sources."""
    order = SEARCH_ORDER if ctx.is_search else RECOMMEND_ORDER
    quotas: Mapping[Source, float] = (
        config.search_quotas if ctx.is_search else config.recommend_quotas
    )
    per_source: dict[Source, tuple[np.ndarray, np.ndarray]] = {}
    for source in order:
        ids = [a.item_ids[a.sources == int(source)] for a in answers]
        scores = [a.scores[a.sources == int(source)] for a in answers]
        if not any(len(i) for i in ids):
            continue
        all_ids, all_scores = np.concatenate(ids), np.concatenate(scores)
        # ties keep shard order, then each shard's own order: the catalog's row order
        best = np.argsort(-all_scores, kind="stable")[:k]
        per_source[source] = (all_ids[best], all_scores[best])
    if not per_source:
        return Candidates.empty()
    # merge works on rows into an id column: number the ids found (any numbering will do:
    # the merge only compares rows for equality and keeps the lists' order)
    uniq = np.unique(np.concatenate([ids for ids, _ in per_source.values()]))
    lists = {
        s: (np.searchsorted(uniq, ids).astype(np.int64), scores)
        for s, (ids, scores) in per_source.items()
    }
    return merge(lists, quotas, k, uniq)
