"""Live catalog updates: price, stock, attributes, new and deleted items, without a rebuild.

The path of a change::

    CatalogService/UpdateItems (gateway)     validate the batch, embed new items' text with
            │                                MiniLM, append to the update log (durable), apply
            ▼                                here, reply
    update log  ── a JSON-lines file (one machine, or a volume every process mounts), or a
            │      Redis stream (``redis://``, ``redis+cluster://``) shared by every host
            ▼
    CatalogFeed (one thread in every process)  polls the log every ``catalog_poll_s`` and
                                               applies what is new to each LiveCatalog

Every process that holds a catalog (gateway, recall, coarse, fine, rerank) loads its build
with *room*: ``catalog_room`` empty, hidden rows after the build's, in the catalog and in
every per-row table (:class:`sluice.artifacts.Artifacts`). A new item takes the next empty
row: its columns and its text vector are written first, the indexes that search text learn
it (``listeners``: BM25 postings, the re-ranker's title keys), and only then is its id
published. Shapes never change while serving, so a request never sees a table shorter than
a row it was given, and no lock is held on the request path.

* Price, stock, category, brand and colour changes are written into the columns in place.
* A deletion hides the row; every source, filter and the re-ranker's eligibility drop hidden
  rows, so it is gone from the next page of every process that applied it (the gateway that
  took the call applies it before it replies).
* A new item is searchable through BM25 and the MiniLM text vectors (searched exactly; the
  build's FAISS index is not changed). It has no behaviour yet: recommendations find it once
  a build has learned it, and the fine ranker scores it neutrally (``FineEngine``).
* Title and description edits of an item the build has change its text (blurbs, refinement,
  dedupe keys) but not its BM25 or vectors until the next build.

A new build reads the whole log on load and applies the changes accepted after its catalog
data was taken (``catalog_as_of_ms`` in its manifest); changes are upserts, so applying one
twice is harmless. Nothing compacts the log yet: it holds every change since it was created.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client import Gauge

from sluice.data.catalog import Catalog

if TYPE_CHECKING:
    from sluice.artifacts import Artifacts
    from sluice.config import ServiceSettings

log = logging.getLogger(__name__)

READ_UP_TO = Gauge(
    "sluice_catalog_read_up_to_timestamp_seconds",
    "When the gateway accepted the newest catalog change that every catalog of this process "
    "has read from the update log (0 before the first); a process behind the gateway's value "
    "serves older prices, stock and items",
)

FIELDS = ("title", "description", "category", "brand", "color", "price_cents", "in_stock")
TEXT_FIELDS = ("title", "description")
STRING_LIMITS = {"title": 1024, "description": 16384, "category": 256, "brand": 256, "color": 256}
MAX_PRICE_CENTS = 1 << 53


@dataclass(frozen=True)
class ItemChange:
    """One item's change, as the update log holds it."""

    item_id: int
    values: Mapping[str, Any] = field(default_factory=dict)  # fields of FIELDS to set
    delete: bool = False
    # MiniLM of the item's text after the change, for an item added after the build
    text_vector: np.ndarray | None = None
    ts_ms: int = 0  # when the gateway accepted it, unix ms (0: unknown)

    def to_json(self) -> str:
        record: dict[str, Any] = {"i": self.item_id, "t": self.ts_ms}
        if self.delete:
            record["d"] = True
        if self.values:
            record["f"] = dict(self.values)
        if self.text_vector is not None:
            vec = np.asarray(self.text_vector, dtype="<f4")
            record["v"] = base64.b64encode(vec.tobytes()).decode()
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> ItemChange:
        """The change a log record holds; ValueError for one this version cannot apply
        (a record written by something else than a gateway)."""
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("f", {}), dict):
            raise ValueError("a record is an object whose f is an object")
        item = record.get("i")
        if not isinstance(item, int) or isinstance(item, bool) or not 0 < item < 1 << 63:
            raise ValueError("i must be an item id from 1 to 2^63-1")
        vector = None
        if "v" in record:
            vector = np.frombuffer(base64.b64decode(record["v"]), dtype="<f4").astype(np.float32)
        values = {k: v for k, v in record.get("f", {}).items() if k in FIELDS}
        problem = check_values(values)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        ts = record.get("t", 0)
        ts = ts if isinstance(ts, int) and not isinstance(ts, bool) and 0 <= ts < 1 << 62 else 0
        return cls(item, values, bool(record.get("d", False)), vector, ts)


def check_values(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first field of ``values`` that no catalog may hold, and why; None when all may.
    The gateway refuses such a call (INVALID_ARGUMENT); the applier skips such a record."""
    for name, value in values.items():
        if name in STRING_LIMITS:
            if not isinstance(value, str):
                return name, "must be a string"
            if len(value) > STRING_LIMITS[name]:
                return name, f"is longer than {STRING_LIMITS[name]} characters"
            if name == "title" and not value.strip():
                return name, "must not be empty"
        elif name == "price_cents" and not (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_PRICE_CENTS
        ):
            return name, "must be 0 or more (and below 2^53)"
        elif name == "in_stock" and not isinstance(value, bool):
            return name, "must be true or false"
    return None


def _decode(lines: Sequence[str]) -> list[ItemChange]:
    changes = []
    for line in lines:
        try:
            changes.append(ItemChange.from_json(line))
        except (ValueError, KeyError, TypeError, OverflowError) as err:  # not a gateway's
            log.error("catalog update log: a record that does not parse", extra={"error": str(err)})
    return changes


class UpdateLog(Protocol):
    """The durable, ordered log of catalog changes every process follows."""

    def append(self, changes: Sequence[ItemChange]) -> None:
        """Durably append ``changes`` in order (all or, on an error, possibly a prefix)."""
        ...

    def read(self, after: str) -> tuple[list[ItemChange], str]:
        """The changes after position ``after`` ("" is the start) and the new position."""
        ...

    def close(self) -> None: ...


class FileUpdateLog:
    """JSON lines in one file, appended under an exclusive ``flock`` and fsynced: several
    gateways on one machine (or on one shared volume with working locks) may write it. A
    position is a byte offset; a torn last line (a writer killed mid-write) is never read,
    and the next writer cuts it off."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    def append(self, changes: Sequence[ItemChange]) -> None:
        data = "".join(c.to_json() + "\n" for c in changes).encode()
        with open(self.path, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                end = fh.seek(0, os.SEEK_END)
                if end:
                    fh.seek(end - 1)
                    if fh.read(1) != b"\n":  # a writer died mid-line: drop the torn record
                        fh.seek(0)
                        keep = fh.read().rfind(b"\n") + 1
                        fh.truncate(keep)
                        end = keep
                fh.seek(end)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self, after: str) -> tuple[list[ItemChange], str]:
        start = int(after or 0)
        with open(self.path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        # a damaged line does not parse and is skipped (_decode); it must not stop the reader
        lines = complete.decode("utf-8", errors="replace").splitlines()
        return _decode(lines), str(start + len(complete))

    def close(self) -> None:
        pass


class RedisUpdateLog:
    """One Redis stream (one hash slot, so one Redis Cluster master holds it): every host
    follows it. A position is a stream id. Durability is the server's (``appendfsync``)."""

    BATCH = 10_000

    def __init__(self, url: str, key: str = "sluice:{catalog}:updates") -> None:
        from sluice.state.store import connect

        self.client = connect(url)
        self.key = key

    def append(self, changes: Sequence[ItemChange]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for change in changes:
            pipe.xadd(self.key, {"r": change.to_json()})
        pipe.execute()

    def read(self, after: str) -> tuple[list[ItemChange], str]:
        entries = self.client.xrange(self.key, min=f"({after}" if after else "-", count=self.BATCH)
        if not entries:
            return [], after
        return _decode([fields.get("r", "") for _, fields in entries]), entries[-1][0]

    def close(self) -> None:
        self.client.close()


def open_log(spec: str) -> UpdateLog:
    """``redis://…`` or ``redis+cluster://…`` (and ``rediss``): a Redis stream; otherwise a
    file path."""
    if spec.split("://", 1)[0].lower() in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        return RedisUpdateLog(spec)
    return FileUpdateLog(Path(spec))


class LiveCatalog:
    """A loaded build's catalog (with room) and the per-row text vectors, kept up to date."""

    def __init__(
        self, catalog: Catalog, text_vectors: np.ndarray | None, as_of_ms: int = 0
    ) -> None:
        """``as_of_ms``: when the build's catalog data was taken (its manifest's
        ``catalog_as_of_ms``). Changes accepted before then are in that data, or older than
        it: they are skipped, so a new build is not overwritten by stale prices, and items
        added before it do not take its room again."""
        if text_vectors is not None and len(text_vectors) != len(catalog):
            raise ValueError("text vectors and catalog have different row counts")
        self.catalog = catalog
        self.text_vectors = text_vectors
        self.as_of_ms = as_of_ms
        self.position = ""
        self.read_up_to_ms = 0  # the newest accept time of the changes read so far
        # called with rows whose text is new (items added live), after their columns are
        # written and before their ids are published
        self.listeners: list[Callable[[np.ndarray], None]] = []
        self.skipped = 0  # new items that found no room (logged)

    @property
    def room_left(self) -> int:
        return len(self.catalog) - self.catalog.live_end

    def apply(self, changes: Sequence[ItemChange]) -> None:
        cat = self.catalog
        end = cat.live_end
        added: dict[int, int] = {}  # ids given rows in this batch
        text_rows: list[int] = []
        for change in changes:
            if change.ts_ms < self.as_of_ms:  # the build's own data is as new or newer
                continue
            # the gateway validates what it writes; a record written by anything else may not be
            if not _well_formed(change, self.text_vectors):
                log.error("catalog update skipped: malformed", extra={"item_id": change.item_id})
                continue
            row = added.get(change.item_id, cat.row(change.item_id))
            if change.delete:
                if row >= 0:
                    cat.hidden[row] = True
                continue
            if row < 0:
                if end >= len(cat):
                    self.skipped += 1
                    log.error(
                        "catalog room is full: item not added until the next build",
                        extra={"item_id": change.item_id},
                    )
                    continue
                row, end = end, end + 1
                added[change.item_id] = row
                cat.item_ids[row] = change.item_id
            self._write(row, change.values)
            if row >= cat.build_size and (
                change.item_id in added or any(k in change.values for k in TEXT_FIELDS)
            ):
                if change.text_vector is not None and self.text_vectors is not None:
                    self.text_vectors[row] = change.text_vector
                text_rows.append(row)
            cat.hidden[row] = False
        if text_rows:
            rows = np.unique(np.asarray(text_rows, dtype=np.int64))
            for listener in self.listeners:
                listener(rows)
        cat.publish(end, list(added.values()))
        self.read_up_to_ms = max([self.read_up_to_ms, *(c.ts_ms for c in changes)])

    def _write(self, row: int, values: Mapping[str, Any]) -> None:
        cat = self.catalog
        for name, value in values.items():
            if name == "title":
                cat.titles[row] = str(value)
            elif name == "description":
                cat.descriptions[row] = str(value)
            elif name == "category":
                cat.category_codes[row] = cat.code_of("category", str(value))
            elif name == "brand":
                cat.brand_codes[row] = cat.code_of("brand", str(value))
            elif name == "color":
                cat.color_codes[row] = cat.code_of("color", str(value))
            elif name == "price_cents":
                cat.price_cents[row] = int(value)
            elif name == "in_stock":
                cat.in_stock[row] = bool(value)


def _well_formed(change: ItemChange, vectors: np.ndarray | None) -> bool:
    """Whether applying ``change`` cannot fail: values any catalog may hold, a text vector
    of the catalog's width (a change made in this process skipped :meth:`from_json`)."""
    if check_values(change.values) is not None or not 0 < change.item_id < 1 << 63:
        return False
    vector = change.text_vector
    if vector is None or vectors is None:
        return True
    return vector.shape == vectors.shape[1:] and bool(np.isfinite(vector).all())


class CatalogFeed:
    """Follows one update log for every LiveCatalog of this process: a thread polls it."""

    def __init__(self, update_log: UpdateLog, poll_s: float) -> None:
        self.log = update_log
        self.poll_s = poll_s
        self._live: list[LiveCatalog] = []
        self._lock = threading.Lock()  # one applier at a time (the thread, or a writer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, live: LiveCatalog) -> Callable[[], None]:
        """Apply the whole log to ``live`` now, then keep it up to date; returns the detach."""
        with self._lock:
            self._catch_up(live)
            self._live.append(live)
            self._report()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="catalog-feed", daemon=True)
                self._thread.start()

        def detach() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._live.remove(live)

        return detach

    def catch_up(self) -> None:
        """Apply what is new in the log to every followed catalog, now."""
        with self._lock:
            for live in self._live:
                self._catch_up(live)
            self._report()

    def _report(self) -> None:
        READ_UP_TO.set(min(live.read_up_to_ms for live in self._live) / 1000 if self._live else 0)

    def _catch_up(self, live: LiveCatalog) -> None:
        while True:
            changes, position = self.log.read(live.position)
            if position == live.position:
                return
            live.apply(changes)
            live.position = position

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.catch_up()
            except Exception as err:  # the log's store is down: the pages stay as they are
                log.warning("catalog update log unreadable", extra={"error": str(err)[:300]})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.log.close()


_FEEDS: dict[str, CatalogFeed] = {}
_FEEDS_LOCK = threading.Lock()


def feed_for(settings: ServiceSettings) -> CatalogFeed | None:
    """This process's feed of the settings' update log (one per log); None when off."""
    if not settings.catalog_updates:
        return None
    with _FEEDS_LOCK:
        feed = _FEEDS.get(settings.catalog_updates)
        if feed is None:
            feed = CatalogFeed(open_log(settings.catalog_updates), settings.catalog_poll_s)
            _FEEDS[settings.catalog_updates] = feed
        return feed


def serving_artifacts(root: Path, settings: ServiceSettings) -> Artifacts:
    """A build as a service loads it: with room for new items when updates are on."""
    from sluice.artifacts import Artifacts

    return Artifacts(root, settings.catalog_room if settings.catalog_updates else 0)


def follow_updates(
    settings: ServiceSettings,
    artifacts: Artifacts,
    closers: list[Callable[[], None]],
    *listeners: Callable[[LiveCatalog, np.ndarray], None],
    text_vectors: bool = True,
) -> LiveCatalog | None:
    """Keep ``artifacts``' catalog (and its text vectors, unless the process reads none) up
    to date with the update log, after applying all of it now; ``listeners`` learn the rows
    of new items' text. None when updates are off."""
    feed = feed_for(settings)
    if feed is None:
        return None
    as_of = int(artifacts.manifest.get("catalog_as_of_ms", 0))
    live = LiveCatalog(artifacts.catalog, artifacts.text_vectors if text_vectors else None, as_of)
    for listener in listeners:
        live.listeners.append(functools.partial(listener, live))
    closers.append(feed.follow(live))
    return live


def lexical_listener(lexical: Any) -> Callable[[LiveCatalog, np.ndarray], None]:
    """Index new items' text in a :class:`~sluice.recall.lexical.LexicalIndex`."""

    def add(live: LiveCatalog, rows: np.ndarray) -> None:
        cat = live.catalog
        build = cat.build_size
        lexical.add_rows(
            rows.tolist(),
            [cat.titles[r] for r in rows.tolist()],
            [cat.descriptions[r] for r in rows.tolist()],
            lambda: (cat.titles[:build], cat.descriptions[:build]),
        )

    return add
