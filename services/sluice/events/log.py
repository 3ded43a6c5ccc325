"""Append-only event log with group commit.

Records are ``<u32 length><u32 crc32(length bytes + payload)><payload>``; one
record per event. Concurrent :meth:`EventLog.append` calls queue their encoded
records; a single writer thread writes everything pending in one ``write`` and
one ``fdatasync`` and then wakes the callers, so a caller returns only once its
records are durable. On open, the last segment is scanned and a torn or
corrupt tail (a crash mid-write) is truncated. Segments rotate by size.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from sluice.events.model import Event, EventType, now_ms

logger = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
_HEADER = struct.Struct("<II")
# appended_ms, type, item_id, timestamp_ms, then byte lengths of event_id, user_id, query
_FIXED = struct.Struct("<qBqqHHH")
_MAX_FIELD = 0xFFFF
_MAX_PAYLOAD = _FIXED.size + 3 * _MAX_FIELD
_SEGMENT_SUFFIX = ".log"
_SYNC = getattr(os, "fdatasync", os.fsync)


class LogError(Exception):
    """The log cannot be used (write or fsync failed, or it is closed)."""


class LogCorruptedError(LogError):
    """A sealed segment is damaged; the log refuses to open rather than skip data."""


def encode_record(event: Event, appended_ms: int) -> bytes:
    """Serialise one event as a framed record."""
    eid = event.event_id.encode()
    uid = event.user_id.encode()
    query = event.query.encode()
    if max(len(eid), len(uid), len(query)) > _MAX_FIELD:
        raise ValueError("event field longer than 65535 bytes")
    payload = (
        _FIXED.pack(
            appended_ms,
            int(event.type),
            event.item_id,
            event.timestamp_ms,
            len(eid),
            len(uid),
            len(query),
        )
        + eid
        + uid
        + query
    )
    size = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(_LEN.pack(size)))
    return _HEADER.pack(size, crc) + payload


def _decode_payload(payload: memoryview) -> tuple[int, Event] | None:
    appended, kind, item_id, ts, n_eid, n_uid, n_query = _FIXED.unpack_from(payload, 0)
    start = _FIXED.size
    if start + n_eid + n_uid + n_query != len(payload):
        return None
    try:
        eid = str(payload[start : start + n_eid], "utf-8")
        start += n_eid
        uid = str(payload[start : start + n_uid], "utf-8")
        start += n_uid
        query = str(payload[start:], "utf-8")
        event_type = EventType(kind)
    except ValueError:
        return None
    return appended, Event(eid, uid, item_id, event_type, ts, query)


def _records(data: bytes) -> Iterator[tuple[int, int, Event]]:
    """Yield ``(end_offset, appended_ms, event)`` up to the first invalid record."""
    view = memoryview(data)
    offset = 0
    end = len(data)
    while offset + _HEADER.size <= end:
        size, crc = _HEADER.unpack_from(view, offset)
        if size < _FIXED.size or size > _MAX_PAYLOAD or offset + _HEADER.size + size > end:
            return
        body = view[offset + _HEADER.size : offset + _HEADER.size + size]
        if zlib.crc32(body, zlib.crc32(_LEN.pack(size))) != crc:
            return
        decoded = _decode_payload(body)
        if decoded is None:
            return
        offset += _HEADER.size + size
        yield offset, decoded[0], decoded[1]


def _valid_length(data: bytes) -> int:
    return max((end for end, _, _ in _records(data)), default=0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_directory(directory: Path) -> int:
    """Hold an exclusive lock so that one process at a time writes the log."""
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogError(f"event log {directory} is open in another process") from None
    return fd


def _read_prefix(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


class EventLog:
    """Durable, append-only, segmented log of events with group commit.

    Thread-safe. ``fsync=False`` still writes before acknowledging (survives a
    process crash, not a power loss).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        segment_bytes: int = 64 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        # Counters (cumulative since open), exported by sluice.events.metrics.
        self.commits = 0
        self.fsyncs = 0
        self.records_written = 0
        self.bytes_written = 0
        self.commit_seconds_total = 0.0
        self.last_commit_records = 0
        self.max_commit_records = 0
        self.commit_ms_ewma = 0.0
        self.truncated_bytes = 0

        self._lock = threading.Lock()
        self._io = threading.Lock()  # held while a segment file is written or rewritten
        self._work = threading.Condition(self._lock)
        self._done = threading.Condition(self._lock)
        self._pending: list[bytes] = []
        self._pending_records = 0
        self._next_ticket = 1
        self._durable_ticket = 0
        self._failed: BaseException | None = None
        self._closing = False
        self._closed = False

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(self.directory)
        self._sealed: list[tuple[Path, int]] = []
        try:
            self._path, self._size = self._recover_segments()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._durable_size = self._size
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        self._writer = threading.Thread(target=self._run, name="event-log-writer", daemon=True)
        self._writer.start()

    # -- opening ---------------------------------------------------------------

    def _segment_paths(self) -> list[Path]:
        paths = [
            p
            for p in self.directory.iterdir()
            if p.suffix == _SEGMENT_SUFFIX and p.stem.isdigit() and p.is_file()
        ]
        return sorted(paths, key=lambda p: int(p.stem))

    def _new_segment(self, index: int) -> Path:
        path = self.directory / f"{index:08d}{_SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        _fsync_dir(self.directory)
        return path

    def _recover_segments(self) -> tuple[Path, int]:
        paths = self._segment_paths()
        if not paths:
            return self._new_segment(1), 0
        for path in paths[:-1]:
            data = path.read_bytes()
            if _valid_length(data) != len(data):
                raise LogCorruptedError(f"sealed log segment {path} is damaged")
            self._sealed.append((path, len(data)))
        last = paths[-1]
        data = last.read_bytes()
        valid = _valid_length(data)
        if valid != len(data):
            self.truncated_bytes = len(data) - valid
            logger.warning(
                "truncating torn tail of event log",
                extra={"segment": str(last), "dropped_bytes": self.truncated_bytes},
            )
            fd = os.open(last, os.O_WRONLY)
            try:
                os.ftruncate(fd, valid)
                os.fsync(fd)
            finally:
                os.close(fd)
        return last, valid

    # -- appending -------------------------------------------------------------

    def append(self, events: Sequence[Event], *, timeout: float | None = None) -> None:
        """Append ``events`` and return once they are durable.

        Raises :class:`LogError` if the log is closed or the write failed, and
        ``TimeoutError`` after ``timeout`` seconds (the events may still be
        written later).
        """
        if not events:
            return
        appended = now_ms()
        data = b"".join([encode_record(e, appended) for e in events])
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check_usable()
            self._pending.append(data)
            self._pending_records += len(events)
            ticket = self._next_ticket
            self._next_ticket += 1
            self._work.notify()
            while self._durable_ticket < ticket:
                if self._failed is not None:
                    raise LogError("event log write failed") from self._failed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("event log append timed out")
                self._done.wait(remaining)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise LogError("event log write failed") from self._failed
        if self._closing:
            raise LogError("event log is closed")

    @property
    def pending_records(self) -> int:
        """Records queued but not yet handed to the writer."""
        return self._pending_records

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._work.wait()
                if not self._pending:
                    return
                chunks, self._pending = self._pending, []
                records, self._pending_records = self._pending_records, 0
                ticket = self._next_ticket - 1
            data = b"".join(chunks)
            started = time.perf_counter()
            try:
                with self._io:
                    self._write_all(data)
                    if self.fsync:
                        _SYNC(self._fd)
                    if self._size >= self.segment_bytes:
                        self._rotate()
            except Exception as exc:
                self._fail(exc)
                return
            elapsed = time.perf_counter() - started
            with self._lock:
                self._durable_ticket = ticket
                self._durable_size = self._size
                self.commits += 1
                self.fsyncs += int(self.fsync)
                self.records_written += records
                self.bytes_written += len(data)
                self.commit_seconds_total += elapsed
                self.last_commit_records = records
                self.max_commit_records = max(self.max_commit_records, records)
                self.commit_ms_ewma = 0.8 * self.commit_ms_ewma + 0.2 * elapsed * 1000.0
                self._done.notify_all()

    def _fail(self, exc: Exception) -> None:
        logger.exception("event log write failed; the log is now unusable")
        with self._lock:
            self._failed = exc
            self._done.notify_all()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def _rotate(self) -> None:
        if not self.fsync:
            os.fsync(self._fd)
        path = self._new_segment(int(self._path.stem) + 1)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.close(self._fd)
        with self._lock:
            self._sealed.append((self._path, self._size))
            self._fd, self._path, self._size, self._durable_size = fd, path, 0, 0
        logger.info("event log rotated", extra={"segment": str(path)})

    # -- erasing ---------------------------------------------------------------

    def erase_user(self, user_id: str) -> int:
        """Rewrite every segment without the user's events (their erase markers stay);
        returns how many records went. What was appended before the call is made durable
        first, so it is erased too. Each rewritten segment is written beside the old one,
        synced, and renamed over it: a crash leaves either the old or the new file. Appends
        wait meanwhile. An I/O failure raises :class:`LogError`."""
        with self._lock:  # first, everything appended so far is on disk
            self._check_usable()
            ticket = self._next_ticket - 1
            while self._durable_ticket < ticket:
                if self._failed is not None:
                    raise LogError("event log write failed") from self._failed
                self._done.wait()
        removed = 0
        with self._io:
            with self._lock:
                self._check_usable()
                segments = [*self._sealed, (self._path, self._size)]
            try:
                for path, size in segments:
                    removed += self._rewrite_without(path, size, user_id)
            except OSError as exc:
                raise LogError(f"erasing from {self.directory} failed: {exc}") from exc
        logger.info("user erased from the event log", extra={"records": removed})
        return removed

    def _rewrite_without(self, path: Path, size: int, user_id: str) -> int:
        """Rewrite one segment without the user's events (holding ``_io``); the bookkeeping
        follows each rename at once, so a failure later leaves it consistent."""
        data = _read_prefix(path, size)
        kept: list[bytes] = []
        start = gone = 0
        for end, _, event in _records(data):
            if event.user_id == user_id and event.type is not EventType.ERASE:
                gone += 1
            else:
                kept.append(data[start:end])
            start = end
        if not gone:
            return 0
        body = b"".join(kept)
        tmp = path.with_suffix(".compact")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with self._lock:
            if path == self._path:  # the active segment: append to the new file from now on
                os.close(self._fd)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                self._size = self._durable_size = len(body)
            else:
                self._sealed = [(p, len(body) if p == path else n) for p, n in self._sealed]
        _fsync_dir(self.directory)
        return gone

    # -- reading ---------------------------------------------------------------

    def replay(self, since_ms: int | None = None) -> Iterator[Event]:
        """Yield the durable events in append order.

        ``since_ms`` keeps only records appended (server clock) at or after it.
        """
        with self._lock:
            segments = [*self._sealed, (self._path, self._durable_size)]
        for path, size in segments:
            if size == 0:
                continue
            for _, appended, event in _records(_read_prefix(path, size)):
                if since_ms is None or appended >= since_ms:
                    yield event

    @property
    def segment_count(self) -> int:
        return len(self._sealed) + 1

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Write what is pending, stop the writer and close the file."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._work.notify()
        self._writer.join()
        with self._io, self._lock:  # not while a segment is being rewritten
            self._closed = True
            os.close(self._fd)
            os.close(self._lock_fd)  # releases the directory lock

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
