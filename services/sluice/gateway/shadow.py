"""Shadow arms: an experiment's shadow settings scored off the request path and logged.

After a page is served, the gateway hands the re-ranking stage's input (the request's
context and the fine-ranked candidates) to :class:`ShadowArms`, which asks the re-ranking
stage again on one background thread with the shadow arm's settings and appends one JSON
line per page to ``shadow-<pid>.jsonl`` in the log folder: the served and the shadow item
ids side by side, for offline comparison. The response never waits for it. When
:data:`MAX_PENDING` pages wait already, the next is dropped and counted, so that a slow
shadow cannot hold memory or threads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from sluice.domain import Budget, Candidates, RankContext

log = logging.getLogger(__name__)

MAX_PENDING = 64
TIMEOUT_S = 1.0

SHADOW_PAGES = Counter(
    "sluice_shadow_pages_total",
    "Shadow-arm pages, by result (logged, dropped: too many waiting, failed)",
    ["experiment", "arm", "result"],
)


class ShadowArms:
    """Scores shadow arms on one background thread and logs their pages (see the module)."""

    def __init__(self, log_dir: Path, max_pending: int = MAX_PENDING) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"shadow-{os.getpid()}.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 closed in close()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")

    def submit(
        self,
        rerank: Any,
        experiment: str,
        arm: str,
        ctx: RankContext,
        cands: Candidates,
        page_size: int,
        offset: int,
        served: dict[str, Any],
    ) -> bool:
        """Score ``arm`` for this page later with ``rerank`` (the gateway's client of the
        re-ranking stage: ``call(ctx, cands, budget)``); False when it was dropped."""
        if not self._slots.acquire(blocking=False):
            SHADOW_PAGES.labels(experiment, arm, "dropped").inc()
            return False
        try:
            self._pool.submit(
                self._run, rerank, experiment, arm, ctx, cands, page_size, offset, served
            )
        except RuntimeError:  # shut down
            self._slots.release()
            return False
        return True

    def _run(
        self,
        rerank: Any,
        experiment: str,
        arm: str,
        ctx: RankContext,
        cands: Candidates,
        page_size: int,
        offset: int,
        served: dict[str, Any],
    ) -> None:
        try:
            result = rerank.call(ctx, cands, Budget.within(page_size, TIMEOUT_S, offset))
            line = served | {
                "experiment": experiment,
                "shadow_arm": arm,
                "shadow_item_ids": result.candidates.item_ids.tolist(),
                "logged_at": time.time(),
            }
            with self._lock:
                self._file.write(json.dumps(line) + "\n")
                self._file.flush()
            SHADOW_PAGES.labels(experiment, arm, "logged").inc()
        except Exception:  # a shadow never fails anything: count it and go on
            SHADOW_PAGES.labels(experiment, arm, "failed").inc()
            log.warning("shadow arm failed", extra={"arm": arm}, exc_info=True)
        finally:
            self._slots.release()

    def drain(self) -> None:
        """Wait until every page submitted so far is logged (or failed)."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            self._file.close()
