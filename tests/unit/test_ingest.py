"""Ingestor: validation, dedupe, durability before ack, recovery and backpressure."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from sluice.core.errors import InvalidArgument, ResourceExhausted, Unavailable
from sluice.events import log as log_module
from sluice.events.ingest import MAX_BATCH, Ingestor
from sluice.events.log import EventLog
from sluice.events.model import Event, EventResult, EventStatus, EventType, now_ms
from sluice.state.store import InMemoryStateStore, RedisStateStore

ATTRS = {i: (f"cat{i % 3}", f"brand{i % 2}") for i in range(1, 100)}
ACCEPTED, DUPLICATE, REJECTED = EventStatus.ACCEPTED, EventStatus.DUPLICATE, EventStatus.REJECTED
CONFLICT = EventStatus.CONFLICT


def ev(eid: str, user: str = "u", item: int = 1, kind: int = 1, ts: int | None = None) -> Event:
    return Event.from_wire(eid, user, item, kind, now_ms() if ts is None else ts)


def statuses(results: list[EventResult]) -> list[EventStatus]:
    return [r.status for r in results]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for an observable condition (not for an amount of time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.0005)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    with EventLog(tmp_path / "log") as event_log:
        yield event_log


@pytest.fixture
def ingestor(log: EventLog) -> Ingestor:
    return Ingestor(log, InMemoryStateStore(ATTRS), known_item=lambda item: item < 100)


def test_partly_bad_batch_gets_per_event_results(ingestor: Ingestor) -> None:
    now = now_ms()
    batch = [
        ev("ok1", item=1),
        ev("", item=1),
        ev("x" * 129),
        ev("no-user", user=""),
        ev("bad-type", kind=0),
        ev("bad-type-9", kind=9),
        ev("zero-item", item=0),
        ev("unknown-item", item=500),
        ev("future", ts=now + 3_600_000),
        ev("negative-ts", ts=-5),
        ev("ok2", item=2, kind=EventType.PURCHASE),
        ev("year-1970", ts=1),
        ev("year-2000", ts=946_684_800_000),
        ev("   "),
        ev("tab\there"),
        ev("nul-user", user="u\x00"),
        ev("blank-user", user=" \u3000 "),
    ]
    results = ingestor.track(batch)
    assert statuses(results) == [ACCEPTED] + [REJECTED] * 9 + [ACCEPTED] + [REJECTED] * 6
    assert [r.error for r in results[1:10]] == [
        "event_id is empty",
        "event_id is longer than 128 characters",
        "user_id is empty",
        "unknown event type 0",
        "unknown event type 9",
        "item_id must be positive, got 0",
        "item 500 is not in the catalog",
        results[8].error,
        "timestamp_ms must be positive, got -5",
    ]
    assert results[8].error.startswith("timestamp_ms is ")
    assert all(r.error.endswith("s in the past (at most 82800 s allowed)") for r in results[11:13])
    assert [r.error for r in results[13:]] == [
        "event_id is blank",
        "event_id contains control or unassigned characters",
        "user_id contains control or unassigned characters",
        "user_id is blank",
    ]
    assert results[0].error == ""
    assert ingestor.store.history("u") == [1, 2]
    assert ingestor.store.suppressed("u") == frozenset({2})
    assert [e.event_id for e in ingestor.log.replay()] == ["ok1", "ok2"]
    assert (ingestor.events_accepted, ingestor.events_rejected) == (2, 15)


def test_zero_timestamp_means_now(ingestor: Ingestor) -> None:
    before = now_ms()
    assert statuses(ingestor.track([ev("a", ts=0)])) == [ACCEPTED]
    stamped = next(iter(ingestor.log.replay())).timestamp_ms
    assert before <= stamped <= now_ms()
    assert ingestor.store.user_state("u").last_event_ms == stamped


def test_duplicates_within_and_across_batches(ingestor: Ingestor) -> None:
    assert statuses(ingestor.track([ev("a"), ev("b"), ev("a")])) == [
        ACCEPTED,
        ACCEPTED,
        DUPLICATE,
    ]
    assert statuses(ingestor.track([ev("b"), ev("c")])) == [DUPLICATE, ACCEPTED]
    assert ingestor.store.history("u") == [1, 1, 1]
    assert [e.event_id for e in ingestor.log.replay()] == ["a", "b", "c"]
    assert ingestor.events_duplicate == 2
    assert ingestor.track_calls == 2


def test_an_id_reused_for_another_event_is_a_conflict(ingestor: Ingestor) -> None:
    """A retry repeats its payload (DUPLICATE); another event under a used id is a client
    bug that must not pass as a harmless retry (CONFLICT), within a batch and across them."""
    first = ingestor.track([ev("a", item=1), ev("a", item=2), ev("a", item=1)])
    assert statuses(first) == [ACCEPTED, CONFLICT, DUPLICATE]
    assert "used before" in first[1].error
    later = ingestor.track(
        [
            ev("a", item=1, ts=now_ms() - 1000),  # the same event, restamped: a retry
            ev("a", item=1, kind=EventType.PURCHASE),  # the same item, another type
            ev("a", item=1, user="someone-else"),
        ]
    )
    assert statuses(later) == [DUPLICATE, CONFLICT, CONFLICT]
    assert ingestor.store.history("u") == [1]
    assert [e.event_id for e in ingestor.log.replay()] == ["a"]


def test_concurrent_calls_with_the_same_ids_apply_each_once(ingestor: Ingestor) -> None:
    rounds, n_threads = 20, 4
    results: list[list[EventStatus]] = [[] for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        for r in range(rounds):
            barrier.wait()
            res = ingestor.track([ev(f"r{r}-a", item=1 + t), ev(f"r{r}-b", item=1 + t)])
            results[t] += statuses(res)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [s for per in results for s in per]
    assert flat.count(ACCEPTED) == 2 * rounds
    # each thread sends its own item under the shared ids: the losers reused an id
    assert flat.count(CONFLICT) == 2 * rounds * (n_threads - 1)
    assert len(ingestor.store.history("u")) == 2 * rounds


def test_acknowledged_events_are_durable_and_survive_restart(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with EventLog(directory) as log:
        ingestor = Ingestor(log, InMemoryStateStore(ATTRS))
        ingestor.track([ev("a", item=3, kind=EventType.PURCHASE), ev("b", item=4)])
        assert log.fsyncs >= 1
        assert [e.event_id for e in log.replay()] == ["a", "b"]
    with EventLog(directory) as log:
        store = InMemoryStateStore(ATTRS)
        restarted = Ingestor(log, store)
        assert restarted.recover() == 2
        assert store.history("u") == [3, 4]
        assert store.suppressed("u") == frozenset({3})
        retry = ev("a", item=3, kind=EventType.PURCHASE)  # the same event again
        assert statuses(restarted.track([retry, ev("c")])) == [DUPLICATE, ACCEPTED]


def test_recover_into_redis_applies_only_what_is_missing(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    store = RedisStateStore(redis_client, ATTRS, prefix="ing:")
    with EventLog(tmp_path / "log") as log:
        ingestor = Ingestor(log, store)
        ingestor.track([ev("a", item=1), ev("b", item=2)])
        log.append([ev("c", item=3)])  # durable, then the process died before applying it
    with EventLog(tmp_path / "log") as log:
        restarted = Ingestor(log, RedisStateStore(redis_client, ATTRS, prefix="ing:"))
        assert restarted.recover() == 1
        assert restarted.recover() == 0
        assert store.history("u") == [1, 2, 3]
        assert statuses(restarted.track([ev("c", item=3), ev("d", item=4)])) == [
            DUPLICATE,
            ACCEPTED,
        ]
        assert store.history("u") == [1, 2, 3, 4]


def test_overload_raises_resource_exhausted_with_retry_delay(
    log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_sync(fd: int) -> None:  # a disk that has stalled
        entered.set()
        assert release.wait(10)
        os.fsync(fd)

    ingestor = Ingestor(log, InMemoryStateStore(ATTRS), max_in_flight=MAX_BATCH)
    monkeypatch.setattr(log_module, "_SYNC", slow_sync)
    big = [ev(f"big{i}", item=1 + i % 99) for i in range(MAX_BATCH)]
    holder: list[list[EventResult]] = []
    first = threading.Thread(target=lambda: holder.append(ingestor.track(big)))
    first.start()
    try:
        assert entered.wait(10)
        wait_until(lambda: ingestor.in_flight == MAX_BATCH)
        with pytest.raises(ResourceExhausted) as info:
            ingestor.track([ev("late")])
        assert 5 <= info.value.retry_delay_ms <= 1000
        assert ingestor.batches_overloaded == 1
    finally:
        release.set()
        first.join()
    assert statuses(holder[0]) == [ACCEPTED] * MAX_BATCH
    assert ingestor.in_flight == 0
    assert statuses(ingestor.track([ev("late")])) == [ACCEPTED]  # its id was not kept reserved


def test_too_large_batch_is_invalid(ingestor: Ingestor) -> None:
    with pytest.raises(InvalidArgument) as info:
        ingestor.track([ev(f"e{i}") for i in range(MAX_BATCH + 1)])
    assert info.value.field_path == "events"


def test_log_failure_is_unavailable_and_nothing_applied(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log_module, "_SYNC", broken)
    with pytest.raises(Unavailable):
        ingestor.track([ev("a")])
    assert ingestor.store.history("u") == []
    assert not ingestor.store.seen("a")
    assert ingestor.in_flight == 0
    with pytest.raises(Unavailable):
        ingestor.track([ev("a")])


def test_empty_and_all_rejected_batches_touch_nothing(ingestor: Ingestor) -> None:
    assert ingestor.track([]) == []
    assert statuses(ingestor.track([ev("")])) == [REJECTED]
    assert ingestor.log.commits == 0


def test_delete_user_erases_the_log_and_the_state_and_survives_restart(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with EventLog(directory, segment_bytes=100) as log:  # small segments: several rewritten
        ingestor = Ingestor(log, InMemoryStateStore(ATTRS))
        for k in range(6):
            batch = [ev(f"u{k}", user="u", item=1 + k % 3), ev(f"v{k}", user="v", item=2)]
            assert statuses(ingestor.track(batch)) == [ACCEPTED, ACCEPTED]
        assert log.segment_count > 2
        assert ingestor.delete_user("u") == 6
        assert ingestor.delete_user("u") == 0  # idempotent
        assert ingestor.store.history("u") == [] and ingestor.store.erased("u")
        assert ingestor.store.history("v") == [2] * 6
        kinds = [(e.user_id, e.type) for e in log.replay()]
        assert ("u", EventType.VIEW) not in kinds and kinds.count(("v", EventType.VIEW)) == 6
        # new events after the erasure are new data, and are kept
        assert statuses(ingestor.track([ev("u-new", user="u", item=3)])) == [ACCEPTED]
        with pytest.raises(InvalidArgument):
            ingestor.delete_user(" ")
    with EventLog(directory, segment_bytes=100) as log:  # a restart replays the erasure
        store = InMemoryStateStore(ATTRS)
        Ingestor(log, store).recover()
        assert store.history("u") == [3] and store.erased("u")
        assert store.history("v") == [2] * 6


def test_delete_user_while_events_stream_in_loses_none_of_the_others(tmp_path: Path) -> None:
    with EventLog(tmp_path / "log", segment_bytes=2000) as log:
        ingestor = Ingestor(log, InMemoryStateStore(ATTRS))
        stop = threading.Event()
        sent: list[str] = []

        def stream() -> None:
            k = 0
            while not stop.is_set() and k < 400:
                ingestor.track([ev(f"w{k}", user="w", item=1), ev(f"x{k}", user="x", item=2)])
                sent.append(f"w{k}")
                k += 1

        writer = threading.Thread(target=stream)
        writer.start()
        for _ in range(5):
            ingestor.delete_user("x")
        stop.set()
        writer.join()
        ids = [e.event_id for e in log.replay()]
        assert [i for i in ids if i.startswith("w")] == sent  # every other event, in order
