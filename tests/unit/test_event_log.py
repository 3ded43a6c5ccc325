"""Append-only event log: group commit, durability, torn-tail recovery, segments."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sluice.events import log as log_module
from sluice.events.log import EventLog, LogCorruptedError, LogError, encode_record
from sluice.events.model import Event, EventType, now_ms


def events(prefix: str, n: int) -> list[Event]:
    kinds = list(EventType)
    return [
        Event(f"{prefix}{i}", f"user-{i % 3}", 1000 + i, kinds[i % 4], 1_700_000_000_000 + i)
        for i in range(n)
    ]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for an observable condition (not for an amount of time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.0005)


class SyncGate:
    """Replaces the log's fsync: the first call blocks until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10)
        os.fsync(fd)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncGate]:
    g = SyncGate()
    monkeypatch.setattr(log_module, "_SYNC", g)
    yield g
    g.release.set()


def segment(directory: Path, index: int = 1) -> Path:
    return directory / f"{index:08d}.log"


def test_append_then_replay_in_order(tmp_path: Path) -> None:
    batch = [*events("a", 10), Event("ü-😀", "用户", 7, EventType.PURCHASE, 5, "red shoes ß")]
    with EventLog(tmp_path) as log:
        log.append(batch[:4])
        log.append(batch[4:])
        log.append([])
        assert list(log.replay()) == batch
        assert log.records_written == len(batch)
        assert log.fsyncs == log.commits == 2
    with EventLog(tmp_path) as log:
        assert list(log.replay()) == batch
        assert log.truncated_bytes == 0
        log.append(events("b", 3))
        assert list(log.replay()) == batch + events("b", 3)


def test_concurrent_appends_share_one_write_and_fsync(tmp_path: Path, gate: SyncGate) -> None:
    with EventLog(tmp_path) as log:
        first = threading.Thread(target=log.append, args=(events("first", 1),))
        first.start()
        assert gate.entered.wait(10)  # the writer is inside fsync with the first record
        others = [
            threading.Thread(target=log.append, args=(events(f"t{t}-", 5),)) for t in range(8)
        ]
        for t in others:
            t.start()
        wait_until(lambda: log.pending_records == 40)  # all queued behind the fsync
        assert all(t.is_alive() for t in others)  # nobody acknowledged before durable
        gate.release.set()
        first.join()
        for t in others:
            t.join()
        assert log.commits == 2
        assert gate.calls == 2
        assert log.last_commit_records == 40
        assert log.max_commit_records == 40
        assert len(list(log.replay())) == 41


@pytest.mark.parametrize("keep", [1, 4, 8, 20, -1])
def test_torn_tail_is_truncated_on_open(tmp_path: Path, keep: int) -> None:
    good = events("g", 5)
    with EventLog(tmp_path) as log:
        log.append(good)
    torn = encode_record(Event("torn", "u", 1, EventType.VIEW, 1), 1)
    with segment(tmp_path).open("ab") as f:
        f.write(torn[:keep])  # a crash in the middle of writing this record
    size_before = segment(tmp_path).stat().st_size
    with EventLog(tmp_path) as log:
        assert log.truncated_bytes == len(torn[:keep])
        assert segment(tmp_path).stat().st_size == size_before - log.truncated_bytes
        assert list(log.replay()) == good
        log.append(events("after", 2))
    with EventLog(tmp_path) as log:
        assert log.truncated_bytes == 0
        assert list(log.replay()) == good + events("after", 2)


@pytest.mark.parametrize(
    "damage",
    ["flip-payload", "flip-length", "zeros", "huge-length"],
)
def test_corrupt_tail_is_dropped_from_the_bad_record_on(tmp_path: Path, damage: str) -> None:
    good = events("g", 3)
    with EventLog(tmp_path) as log:
        log.append(good)
        valid = segment(tmp_path).stat().st_size
        log.append(events("bad", 2))
    data = bytearray(segment(tmp_path).read_bytes())
    if damage == "flip-payload":
        data[valid + 12] ^= 0x40
    elif damage == "flip-length":
        data[valid] ^= 0x01
    elif damage == "zeros":
        data[valid:] = bytes(len(data) - valid)
    else:
        data[valid : valid + 4] = (2**31).to_bytes(4, "little")
    segment(tmp_path).write_bytes(bytes(data))
    with EventLog(tmp_path) as log:
        assert list(log.replay()) == good
        assert segment(tmp_path).stat().st_size == valid


def test_segments_rotate_and_replay_in_order(tmp_path: Path) -> None:
    with EventLog(tmp_path, segment_bytes=500) as log:
        for b in range(10):
            log.append(events(f"s{b}-", 4))
        assert log.segment_count > 3
        expected = [e for b in range(10) for e in events(f"s{b}-", 4)]
        assert list(log.replay()) == expected
    with EventLog(tmp_path, segment_bytes=500) as log:
        count = log.segment_count
        log.append(events("more", 3))
        assert list(log.replay()) == expected + events("more", 3)
        assert log.segment_count >= count


def test_damaged_sealed_segment_refuses_to_open(tmp_path: Path) -> None:
    with EventLog(tmp_path, segment_bytes=300) as log:
        for b in range(6):
            log.append(events(f"s{b}-", 3))
        assert log.segment_count > 2
    first = segment(tmp_path, 1)
    data = bytearray(first.read_bytes())
    data[20] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(LogCorruptedError):
        EventLog(tmp_path)


def test_replay_since_filters_by_append_time(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(events("old", 2))
        after_old = now_ms()
        wait_until(lambda: now_ms() > after_old)  # the next millisecond
        cutoff = now_ms()
        log.append(events("new", 2))
        assert list(log.replay(since_ms=cutoff)) == events("new", 2)
        assert len(list(log.replay(since_ms=0))) == 4


def test_fsync_off_still_writes_before_acknowledging(tmp_path: Path) -> None:
    with EventLog(tmp_path, fsync=False) as log:
        log.append(events("a", 3))
        assert log.fsyncs == 0
        assert log.commits == 1
        assert segment(tmp_path).stat().st_size > 0
    with EventLog(tmp_path) as log:
        assert list(log.replay()) == events("a", 3)


def test_fsync_failure_fails_the_waiters_and_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "I/O error")

    with EventLog(tmp_path) as log:
        log.append(events("ok", 1))
        monkeypatch.setattr(log_module, "_SYNC", broken)
        with pytest.raises(LogError):
            log.append(events("x", 1))
        with pytest.raises(LogError):
            log.append(events("y", 1))


def test_append_timeout(tmp_path: Path, gate: SyncGate) -> None:
    with EventLog(tmp_path) as log:
        with pytest.raises(TimeoutError):
            log.append(events("slow", 1), timeout=0.05)
        gate.release.set()
        log.append(events("next", 1))
        assert len(list(log.replay())) == 2  # the timed-out record was still written


def test_append_after_close_raises(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.close()
    log.close()
    with pytest.raises(LogError):
        log.append(events("a", 1))


def test_oversized_field_is_refused(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log, pytest.raises(ValueError, match="65535"):
        log.append([Event("a", "u", 1, EventType.VIEW, 1, "q" * 70_000)])


def test_one_writer_per_directory(tmp_path: Path) -> None:
    with EventLog(tmp_path), pytest.raises(LogError, match="another process"):
        EventLog(tmp_path)
    with EventLog(tmp_path) as log:  # released on close
        log.append(events("a", 1))


def test_the_file_log_keeps_its_record_format_with_arm_labels(tmp_path: Path) -> None:
    """The experiment arm label rides in the Redis event stream; the file log keeps the
    record format an older gateway reads (a new field would make it cut the log there on a
    rollback), so a labelled event is written as an unlabelled one."""
    plain = Event("p", "u", 3, EventType.CLICK, 5, "q")
    labelled = replace(plain, arms="mmr=lambda-07,fusion=control")
    assert encode_record(labelled, 1) == encode_record(plain, 1)
    with EventLog(tmp_path) as log:
        log.append([labelled])
    with EventLog(tmp_path) as log:
        assert list(log.replay()) == [plain]
    assert labelled.digest == plain.digest  # the label is not what a retry must repeat
