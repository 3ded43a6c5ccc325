"""Event ingestion: validate, dedupe, log durably, then apply to the online state."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from sluice.core.errors import InvalidArgument, ResourceExhausted, Unavailable
from sluice.events.log import LogError
from sluice.events.model import (
    ACCEPTED,
    CONFLICT,
    DUPLICATE,
    MAX_FUTURE_SKEW_MS,
    MAX_USER_ID_CHARS,
    Event,
    EventResult,
    EventStatus,
    EventType,
    erase_marker,
    now_ms,
    validate_event,
    validate_id,
)
from sluice.state.store import OnlineStateStore

logger = logging.getLogger(__name__)

MAX_BATCH = 1000
"""Most events per :meth:`Ingestor.track` call (``TrackRequest`` allows 1000)."""

_STATUSES = tuple(EventStatus)


class DurableLog(Protocol):
    """What the ingestor needs of its log: the group-commit file log of one process
    (:class:`sluice.events.log.EventLog`) or the shared log on Redis Streams
    (:class:`sluice.events.stream.RedisEventStream`). Both raise ``LogError`` when they
    cannot take a write durably, and keep these counters (``sluice.events.metrics``)."""

    commits: int
    fsyncs: int
    records_written: int
    bytes_written: int
    commit_seconds_total: float
    last_commit_records: int
    commit_ms_ewma: float
    truncated_bytes: int

    def append(self, events: Sequence[Event], *, timeout: float | None = None) -> None:
        """Return once ``events`` are durable."""
        ...

    def erase_user(self, user_id: str) -> int:
        """Remove the user's events (not their erase markers); return how many went."""
        ...

    def replay(self, since_ms: int | None = None) -> Iterator[Event]:
        """The durable events appended at or after ``since_ms``, in append order per user."""
        ...

    def close(self) -> None: ...


class Ingestor:
    """Validates, dedupes, durably logs and applies events.

    An event is acknowledged ACCEPTED only after it is durable in the log (fsync-ed in the
    file log; in Redis Streams, written to the AOF and, where configured, held by replicas)
    and applied to the store. Duplicates (by event id, also within one batch
    or across concurrent calls) are acknowledged DUPLICATE and not applied.
    Thread-safe; one ingestor per log and per store.
    """

    def __init__(
        self,
        log: DurableLog,
        store: OnlineStateStore,
        *,
        known_item: Callable[[int], bool] | None = None,
        known_items: Callable[[Sequence[int]], Sequence[bool]] | None = None,
        max_in_flight: int = 10_000,
        append_timeout_s: float | None = 10.0,
        replay_window_s: float = 600.0,
        max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
    ) -> None:
        """``known_item`` tells whether an item is in the catalog; ``known_items`` does the
        same for a whole batch in one call (cheaper; used instead when given).
        ``max_in_flight`` bounds events accepted for logging but not yet
        durable; beyond it :meth:`track` raises ``ResourceExhausted``.
        ``replay_window_s`` is how far back :meth:`recover` replays into a
        persistent store (an in-memory store gets the whole log).
        """
        if max_in_flight < MAX_BATCH:
            raise ValueError(f"max_in_flight must be at least {MAX_BATCH}")
        if store.persistent and replay_window_s >= store.config.dedupe_ttl_s:
            raise ValueError("replay_window_s must be shorter than the store's dedupe TTL")
        self.log = log
        self.store = store
        self.known_item = known_item
        self.known_items = known_items
        self.max_in_flight = max_in_flight
        self.append_timeout_s = append_timeout_s
        self.replay_window_s = replay_window_s
        self.max_future_skew_ms = max_future_skew_ms
        # Counters (cumulative), exported by sluice.events.metrics.
        self.track_calls = 0
        self.events_received = 0
        self.events_accepted = 0
        self.events_duplicate = 0
        self.events_rejected = 0
        self.batches_overloaded = 0
        self.events_recovered = 0
        self._lock = threading.Lock()
        self._in_flight = 0
        self._reserved: dict[str, str] = {}  # event id -> payload digest, while in flight

    @property
    def in_flight(self) -> int:
        """Events reserved for logging and not yet durable."""
        return self._in_flight

    def recover(self, *, chunk: int = 1000) -> int:
        """Replay the log into the store; return how many events were applied.

        Call once before serving. Applying is idempotent by event id, so
        events already in a persistent store are skipped.
        """
        since = None
        if self.store.persistent:
            since = now_ms() - int(self.replay_window_s * 1000)
        applied = 0
        batch: list[Event] = []
        for event in self.log.replay(since_ms=since):
            if event.type is EventType.ERASE:  # a DeleteUser: what came before it goes
                applied += sum(self.store.apply(batch))
                batch = []
                self.store.forget_user(event.user_id)
                continue
            batch.append(event)
            if len(batch) >= chunk:
                applied += sum(self.store.apply(batch))
                batch = []
        if batch:
            applied += sum(self.store.apply(batch))
        self.events_recovered += applied
        logger.info("event log replayed", extra={"applied": applied, "since_ms": since})
        return applied

    def delete_user(self, user_id: str) -> int:
        """Erase a user (a privacy request): their events leave the durable log, a marker
        takes their place so that a replay erases them again, and the online store forgets
        their history, purchases and affinities. Idempotent; returns how many logged events
        went. Aggregates they contributed to (popularity counts) keep no identity and stay."""
        reason = validate_id("user_id", user_id, MAX_USER_ID_CHARS)
        if reason is not None:
            raise InvalidArgument(reason, field_path="user_id")
        try:
            removed = self.log.erase_user(user_id)
            self.log.append([erase_marker(user_id, now_ms())], timeout=self.append_timeout_s)
        except LogError as exc:
            raise Unavailable(f"event log unavailable: {exc}") from exc
        except TimeoutError as exc:
            raise Unavailable("event log is too slow; retry") from exc
        self.store.forget_user(user_id)
        return removed

    def _retry_delay_ms(self) -> int:
        per_commit = self.log.records_written / self.log.commits if self.log.commits else 100.0
        commits_to_drain = 1.0 + self._in_flight / max(per_commit, 1.0)
        delay = max(self.log.commit_ms_ewma, 1.0) * commits_to_drain
        return int(min(max(math.ceil(delay), 5), 1000))

    def _known_item_of(self, events: Sequence[Event]) -> Callable[[int], bool] | None:
        """The catalog check for one batch: with ``known_items``, one lookup for all its
        items (ids that cannot be items are left to :func:`validate_event` to reject)."""
        if self.known_items is None:
            return self.known_item
        ids = list({e.item_id for e in events if 0 < e.item_id < 1 << 63})
        known = {item for item, ok in zip(ids, self.known_items(ids), strict=True) if ok}
        return known.__contains__

    def track(self, events: Sequence[Event]) -> list[EventResult]:
        """Record a batch; return one result per event, in order.

        Raises ``InvalidArgument`` for a batch over :data:`MAX_BATCH`,
        ``ResourceExhausted`` (with a retry delay) when too much is in flight,
        and ``Unavailable`` when the log cannot be written.
        """
        if len(events) > MAX_BATCH:
            raise InvalidArgument(
                f"at most {MAX_BATCH} events per call, got {len(events)}", field_path="events"
            )
        now = now_ms()
        results: list[EventResult | None] = [None] * len(events)
        valid: list[tuple[int, Event]] = []
        known_item = self._known_item_of(events)
        for i, event in enumerate(events):
            if event.timestamp_ms == 0:
                event = event.at(now)  # 0 means now
            reason = validate_event(
                event,
                now=now,
                known_item=known_item,
                max_future_skew_ms=self.max_future_skew_ms,
            )
            if reason is None:
                valid.append((i, event))
            else:
                results[i] = EventResult(EventStatus.REJECTED, reason)

        # Reserve ids so a concurrent call with the same id sees a duplicate.
        # Reserve first, then consult the store: an id is marked seen in the
        # store before its reservation is dropped, so no window lets it through.
        reserved: list[tuple[int, Event]] = []
        digests = [event.digest for _, event in valid]  # hashed before taking the lock
        with self._lock:
            self.track_calls += 1
            self.events_received += len(events)
            for (i, event), payload in zip(valid, digests, strict=True):
                held = self._reserved.get(event.event_id)
                if held is not None:
                    results[i] = DUPLICATE if held == payload else CONFLICT
                else:
                    self._reserved[event.event_id] = payload
                    reserved.append((i, event))
            if self._in_flight + len(reserved) > self.max_in_flight:
                for _, e in reserved:
                    del self._reserved[e.event_id]
                self.batches_overloaded += 1
                raise ResourceExhausted(
                    f"event ingestion is behind ({self._in_flight} events in flight)",
                    retry_delay_ms=self._retry_delay_ms(),
                )
            self._in_flight += len(reserved)
        in_flight = len(reserved)
        try:
            fresh: list[tuple[int, Event]] = []
            for (i, event), digest in zip(
                reserved, self.store.digests([e.event_id for _, e in reserved]), strict=True
            ):
                if digest is None:
                    fresh.append((i, event))
                elif digest in (event.digest, ""):  # "": marked before digests were kept
                    results[i] = DUPLICATE
                else:
                    results[i] = CONFLICT
            if fresh:
                to_log = [e for _, e in fresh]
                try:
                    self.log.append(to_log, timeout=self.append_timeout_s)
                except LogError as exc:
                    raise Unavailable(f"event log unavailable: {exc}") from exc
                except TimeoutError as exc:
                    raise Unavailable("event log is too slow; retry") from exc
                finally:
                    with self._lock:
                        self._in_flight -= in_flight
                        in_flight = 0
                applied = self.store.apply(to_log)
                for (i, _), ok in zip(fresh, applied, strict=True):
                    results[i] = ACCEPTED if ok else DUPLICATE
        finally:
            with self._lock:
                self._in_flight -= in_flight
                for _, e in reserved:
                    del self._reserved[e.event_id]

        final = [r if r is not None else DUPLICATE for r in results]
        counts = dict.fromkeys(_STATUSES, 0)
        for r in final:
            counts[r.status] += 1
        with self._lock:
            self.events_accepted += counts[EventStatus.ACCEPTED]
            self.events_duplicate += counts[EventStatus.DUPLICATE]
            self.events_rejected += counts[EventStatus.REJECTED] + counts[EventStatus.CONFLICT]
        return final
