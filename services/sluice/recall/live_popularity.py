"""Recall's popularity source when the state store is shared: build-time counts plus live signal.

:class:`LivePopularity` implements :class:`sluice.recall.engine.PopularitySource`.
It blends three distributions over catalog rows:

* ``static`` — the build-time interaction counts (``popularity.npy``);
* ``windowed`` — the store's short-window (1 h half-life) decayed, weighted
  event counts (``top_popular(k, window="short")``);
* ``trending`` — the store's trending ratio (short-window rate over
  long-window rate), as its excess over 1 (``trending(k)``).

Each is normalised to a share (sum 1). The live part is
``(1 - trending_share) * windowed + trending_share * trending`` and gets the
weight ``alpha = max_live_weight * V / (V + pseudo_events)``, where ``V`` is
the weighted live volume read (the sum of the windowed scores): with little
live traffic the build-time counts decide, with a lot the live signal does
(up to ``max_live_weight``). Rows are ordered by
``(1 - alpha) * static + alpha * live``; ties keep the build-time order.

Reads never touch the store: a background thread re-reads it every
``refresh_s`` (three round trips) and swaps in a new, immutable order, so a
request never waits on Redis. If the store cannot be read the last good
order is kept for ``max_stale_s``, then the build-time order is used until
the store answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from sluice.core.errors import Unavailable
from sluice.data.catalog import RowIndex
from sluice.recall.sources import first_allowed

log = logging.getLogger(__name__)


class PopularityReader(Protocol):
    """The part of :class:`sluice.state.store.OnlineStateStore` this source reads."""

    def top_popular(
        self, k: int, *, window: Literal["short", "long"] = "long"
    ) -> list[tuple[int, float]]: ...

    def trending(self, k: int) -> list[tuple[int, float]]: ...


@dataclass(frozen=True)
class BlendConfig:
    """How live popularity is blended with the build-time counts."""

    max_live_weight: float = 0.7
    """Weight of the live part once live volume is far above ``pseudo_events``."""
    pseudo_events: float = 200.0
    """Weighted live events (view 1 ... purchase 8) at which live gets half its weight."""
    trending_share: float = 0.3
    """Share of the trending score within the live part (the rest: windowed counts)."""
    live_k: int = 500
    """Live items read per refresh, from each of windowed popularity and trending."""
    refresh_s: float = 1.0
    max_stale_s: float = 30.0
    """Keep the last live order this long while the store is unreachable."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_live_weight <= 1.0:
            raise ValueError("max_live_weight must be in [0, 1]")
        if not 0.0 <= self.trending_share <= 1.0:
            raise ValueError("trending_share must be in [0, 1]")
        if self.pseudo_events <= 0 or self.live_k <= 0 or self.refresh_s <= 0:
            raise ValueError("pseudo_events, live_k and refresh_s must be positive")


@dataclass(frozen=True)
class Snapshot:
    """One blended order (immutable; swapped in whole)."""

    order: np.ndarray
    """Catalog rows, most popular first."""
    live_weight: float
    """``alpha`` used for this order (0 for the build-time order)."""
    live_items: int
    """Catalog rows that had live signal."""
    read_at: float
    """``time.monotonic()`` of the store read (0 for the build-time order)."""
    scores: np.ndarray
    """The score each row is ordered by (the blend, or the build-time score)."""


def _shares(n: int, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=np.float64)
    keep = (rows >= 0) & (scores > 0)
    np.add.at(out, rows[keep], scores[keep])
    total = float(out.sum())
    return out / total if total > 0 else out


def blend(
    static: np.ndarray,
    windowed: tuple[np.ndarray, np.ndarray],
    trending: tuple[np.ndarray, np.ndarray],
    config: BlendConfig,
) -> tuple[np.ndarray, float]:
    """Blended score per row and the live weight ``alpha``.

    ``windowed`` and ``trending`` are ``(rows, scores)``; rows < 0 (items not
    in the catalog) are ignored; trending scores are ratios (1 = steady).
    """
    n = len(static)
    total = float(static.sum())
    static_share = static / total if total > 0 else np.zeros(n, dtype=np.float64)
    w_rows, w_scores = windowed
    t_rows, t_ratios = trending
    keep = (w_rows >= 0) & (w_scores > 0)
    volume = float(w_scores[keep].sum())
    if volume <= 0.0:
        return static_share, 0.0
    windowed_share = _shares(n, w_rows, w_scores)
    trending_share = _shares(n, t_rows, np.maximum(t_ratios - 1.0, 0.0))
    tau = config.trending_share if trending_share.any() else 0.0
    live = (1.0 - tau) * windowed_share + tau * trending_share
    alpha = config.max_live_weight * volume / (volume + config.pseudo_events)
    return (1.0 - alpha) * static_share + alpha * live, alpha


class LivePopularity:
    """Build-time popularity blended with live popularity read from a state store."""

    def __init__(
        self,
        static: np.ndarray,
        item_ids: np.ndarray,
        store: PopularityReader,
        config: BlendConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``static`` is the build-time score per catalog row, ``item_ids`` the
        item id of each row."""
        if len(static) != len(item_ids):
            raise ValueError("static scores and item ids must have one entry per catalog row")
        self.static = np.asarray(static, dtype=np.float64)
        self.config = config or BlendConfig()
        self.store = store
        self._clock = clock
        self._index = RowIndex(np.asarray(item_ids, dtype=np.int64))
        self._static_order = np.argsort(-self.static, kind="stable")
        self._static = Snapshot(self._static_order, 0.0, 0, 0.0, self.static)
        self._snapshot = self._static
        self._last_ok = 0.0
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Counters, for logs and tests.
        self.refreshes = 0
        self.failures = 0

    # -- PopularitySource ------------------------------------------------------
    def top_rows(self, k: int, allowed: np.ndarray | None) -> np.ndarray:
        order = self._snapshot.order  # one reference read: never a half-built order
        return first_allowed(order, k, allowed)

    def scores_of(self, rows: np.ndarray) -> np.ndarray:
        return self._snapshot.scores[rows].astype(np.float32)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- refreshing ----------------------------------------------------------------
    def rows(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Catalog rows of ``item_ids``; -1 for ids not in the catalog."""
        return self._index.rows(item_ids)

    def _pairs(self, pairs: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows([item for item, _ in pairs])
        scores = np.fromiter((s for _, s in pairs), dtype=np.float64, count=len(pairs))
        return rows, scores

    def refresh(self) -> bool:
        """Read the store once and swap in the new order; False if it could not be read."""
        k = self.config.live_k
        try:
            windowed = self.store.top_popular(k, window="short")
            trending = self.store.trending(k)
        except Unavailable as err:
            self.failures += 1
            now = self._clock()
            if not self._failing:
                log.warning("live popularity unavailable; keeping the last order", exc_info=err)
            self._failing = True
            if self._snapshot is not self._static and now - self._last_ok > self.config.max_stale_s:
                log.warning("live popularity stale; using build-time popularity")
                self._snapshot = self._static
            return False
        now = self._clock()
        live = self._pairs(windowed), self._pairs(trending)
        scores, alpha = blend(self.static, *live, self.config)
        if alpha == 0.0:
            order, scores = self._static_order, self.static
        else:  # sort the build-time order by blended score: ties keep the build-time order
            order = self._static_order[np.argsort(-scores[self._static_order], kind="stable")]
        live_items = int(np.count_nonzero(self.rows([i for i, _ in windowed]) >= 0))
        self._snapshot = Snapshot(order, alpha, live_items, now, scores)
        self._last_ok = now
        self.refreshes += 1
        if self._failing:
            log.info("live popularity readable again")
            self._failing = False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.config.refresh_s):
            try:
                self.refresh()
            except Exception:  # a bug must not stop the refresher; recall keeps serving
                log.exception("live popularity refresh failed")

    def start(self) -> LivePopularity:
        """Refresh every ``refresh_s`` in a daemon thread (the first read is synchronous)."""
        if self._thread is None:
            self.refresh()
            self._thread = threading.Thread(target=self._run, name="live-popularity", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
