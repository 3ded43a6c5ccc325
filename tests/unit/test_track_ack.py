"""Track's ack path: an ack follows its group's fsync, a failed fsync fails its whole group
and applies none of it, the next group's fsync does not wait for a state apply, read your
writes after every ack, the batch catalog check, and the server-side latency figures."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from tests.unit.test_ingest import ev, statuses, wait_until

from sluice.core.errors import Unavailable
from sluice.events import log as log_module
from sluice.events.ingest import Ingestor
from sluice.events.log import EventLog
from sluice.events.metrics import histogram_quantile
from sluice.events.model import Event, EventResult, EventStatus, EventType, validate_id
from sluice.events.visibility import server_quantiles
from sluice.state.store import InMemoryStateStore

ATTRS = {i: (f"cat{i % 3}", f"brand{i % 2}") for i in range(1, 100)}
ACCEPTED, REJECTED = EventStatus.ACCEPTED, EventStatus.REJECTED


class Calls:
    """Runs calls on threads and keeps each one's result or exception."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self.threads: dict[str, threading.Thread] = {}

    def start(self, name: str, fn: Callable[[], Any]) -> threading.Thread:
        def run() -> None:
            try:
                self.results[name] = fn()
            except BaseException as exc:  # kept for the test to check
                self.errors[name] = exc

        thread = threading.Thread(target=run, name=name)
        self.threads[name] = thread
        thread.start()
        return thread

    def join(self) -> None:
        for thread in self.threads.values():
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} did not finish"


class Sync:
    """Replaces the log's fdatasync: each call blocks until released, then syncs or fails
    as told, and records that it returned."""

    def __init__(self, *, fail_from_call: int | None = None) -> None:
        self.fail_from_call = fail_from_call
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        call = self.calls
        self.entered.set()
        assert self.release.wait(10)
        if self.fail_from_call is not None and call >= self.fail_from_call:
            raise OSError(5, "I/O error")
        os.fsync(fd)
        self.returned.set()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    with EventLog(tmp_path / "log") as event_log:
        yield event_log


def test_the_ack_follows_the_fsync_and_nothing_is_applied_before_it(
    log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = Sync()
    monkeypatch.setattr(log_module, "_SYNC", sync)
    store = InMemoryStateStore(ATTRS)
    ingestor = Ingestor(log, store)
    acked_after_fsync: list[bool] = []

    def track() -> list[EventResult]:
        results = ingestor.track([ev("a", item=3), ev("b", item=4, kind=EventType.PURCHASE)])
        acked_after_fsync.append(sync.returned.is_set())
        return results

    calls = Calls()
    thread = calls.start("track", track)
    assert sync.entered.wait(10)  # the group is in fdatasync
    assert thread.is_alive()  # not acknowledged
    assert store.history("u") == [] and store.suppressed("u") == frozenset()
    assert not store.seen("a") and not store.seen("b")  # nothing applied before durable
    assert ingestor.in_flight == 2
    sync.release.set()
    calls.join()
    assert statuses(calls.results["track"]) == [ACCEPTED, ACCEPTED]
    assert acked_after_fsync == [True]
    assert store.history("u") == [3, 4] and store.suppressed("u") == frozenset({4})
    assert log.fsyncs == 1


def test_a_failed_fsync_fails_every_call_of_its_group_and_applies_none(
    log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = Sync(fail_from_call=2)  # the first group's fsync works, the second one's fails
    monkeypatch.setattr(log_module, "_SYNC", sync)
    store = InMemoryStateStore(ATTRS)
    ingestor = Ingestor(log, store)
    calls = Calls()
    calls.start("first", lambda: ingestor.track([ev("first", user="f", item=1)]))
    assert sync.entered.wait(10)
    for k in range(3):  # they queue behind the first fsync: one group, one fsync
        calls.start(f"g{k}", partial(ingestor.track, [ev(f"g{k}", user=f"g{k}", item=2)]))
    wait_until(lambda: log.pending_records == 3)
    sync.release.set()
    calls.join()
    assert statuses(calls.results["first"]) == [ACCEPTED]
    assert sorted(calls.errors) == ["g0", "g1", "g2"]
    assert all(isinstance(e, Unavailable) for e in calls.errors.values())
    assert sync.calls == 2  # one fsync for the whole second group
    assert store.history("f") == [1]
    for k in range(3):
        assert store.history(f"g{k}") == [] and not store.seen(f"g{k}")
    assert ingestor.in_flight == 0
    with pytest.raises(Unavailable):  # the log stays unusable
        ingestor.track([ev("later", user="f", item=3)])
    assert store.history("f") == [1]


class BlockingApply:
    """A store whose apply of the event ``slow`` waits until released (before it touches
    the real store, so other applies go on)."""

    def __init__(self, inner: InMemoryStateStore) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def apply(self, events: Sequence[Event]) -> list[bool]:
        if any(e.event_id == "slow" for e in events):
            self.entered.set()
            assert self.release.wait(10)
        return self.inner.apply(events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_next_groups_fsync_does_not_wait_for_a_state_apply(log: EventLog) -> None:
    store = BlockingApply(InMemoryStateStore(ATTRS))
    ingestor = Ingestor(log, store)
    calls = Calls()
    calls.start("slow", lambda: ingestor.track([ev("slow", user="s", item=1)]))
    assert store.entered.wait(10)  # durable, now being applied
    assert [e.event_id for e in log.replay()] == ["slow"]
    fast = calls.start("fast", lambda: ingestor.track([ev("fast", user="v", item=2)]))
    fast.join(30)  # a deadlock guard, not a timing: it must finish while "slow" applies
    assert not fast.is_alive(), "the next group waited for the state apply"
    assert statuses(calls.results["fast"]) == [ACCEPTED]
    assert calls.threads["slow"].is_alive() and not store.inner.seen("slow")
    assert log.fsyncs == 2
    store.release.set()
    calls.join()
    assert statuses(calls.results["slow"]) == [ACCEPTED]
    assert store.inner.history("s") == [1] and store.inner.history("v") == [2]


def test_read_your_writes_after_every_ack(log: EventLog) -> None:
    store = InMemoryStateStore(ATTRS)
    ingestor = Ingestor(log, store)
    misses: list[str] = []

    def shopper(t: int) -> None:
        user = f"rw{t}"
        for r in range(15):
            items = [1 + (t * 7 + r + k) % 90 for k in range(5)]
            batch = [
                ev(f"{user}-{r}-{k}", user=user, item=item, kind=4 if k == 4 else 2)
                for k, item in enumerate(items)
            ]
            assert statuses(ingestor.track(batch)) == [ACCEPTED] * 5
            if store.history(user)[-5:] != items or items[4] not in store.suppressed(user):
                misses.append(f"{user} round {r}")

    calls = Calls()
    for t in range(4):
        calls.start(f"shopper{t}", partial(shopper, t))
    calls.join()
    assert not calls.errors
    assert misses == []


def test_the_batch_catalog_check_is_one_call_for_the_batch(log: EventLog) -> None:
    asked: list[list[int]] = []

    def known_items(ids: Sequence[int]) -> list[bool]:
        asked.append(list(ids))
        return [i < 50 for i in ids]

    ingestor = Ingestor(log, InMemoryStateStore(ATTRS), known_items=known_items)
    results = ingestor.track(
        [ev("a", item=1), ev("b", item=60), ev("c", item=1), ev("d", item=0), ev("e", item=-3)]
    )
    assert statuses(results) == [ACCEPTED, REJECTED, ACCEPTED, REJECTED, REJECTED]
    assert results[1].error == "item 60 is not in the catalog"
    assert results[3].error == "item_id must be positive, got 0"
    assert len(asked) == 1 and sorted(asked[0]) == [1, 60]  # each possible id once


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("order-17", None),
        ("müller", None),
        ("a b", None),
        ("a\x7fb", "contains control or unassigned characters"),
        ("a\x1fb", "contains control or unassigned characters"),
        ("zero\u200bwidth", "contains control or unassigned characters"),
        ("   ", "is blank"),
        (" \u3000 ", "is blank"),
    ],
)
def test_ids_with_control_characters_are_refused(value: str, reason: str | None) -> None:
    got = validate_id("user_id", value, 128)
    assert got == (None if reason is None else f"user_id {reason}")


def test_event_at_keeps_every_other_field() -> None:
    event = Event("id", "user", 3, EventType.ADD_TO_CART, 5, "red shoes", "exp=b")
    assert event.at(9) == dataclasses.replace(event, timestamp_ms=9)
    # a new field must be carried by Event.at too (then list it here)
    assert [f.name for f in dataclasses.fields(Event)] == [
        "event_id",
        "user_id",
        "item_id",
        "type",
        "timestamp_ms",
        "query",
        "arms",
    ]


def test_histogram_quantile_interpolates_inside_a_bucket() -> None:
    buckets = [(0.001, 0.0), (0.002, 50.0), (0.005, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.002)
    assert histogram_quantile(buckets, 0.99) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.0015)
    assert math.isnan(histogram_quantile([(0.001, 0.0), (math.inf, 0.0)], 0.5))
    assert histogram_quantile([(0.001, 0.0), (math.inf, 3.0)], 0.5) == 0.001  # beyond


def test_server_quantiles_count_only_what_came_between_two_reads() -> None:
    before = [(0.001, 10.0), (0.002, 10.0), (math.inf, 10.0)]
    after = [(0.001, 10.0), (0.002, 20.0), (math.inf, 20.0)]
    p50, p99 = server_quantiles(before, after)
    assert p50 == pytest.approx(1.5)
    assert p99 == pytest.approx(1.99)
