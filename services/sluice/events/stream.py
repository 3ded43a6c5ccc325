"""Track's durable log on Redis Streams, shared by every gateway (``event_log = "redis"``).

The file log (:mod:`sluice.events.log`) belongs to one gateway process. With several gateways
behind a load balancer, each Track goes to whichever replica the balancer picked, and what it
acknowledged must outlive that replica: so the log lives in Redis, next to the shared state.

Layout (``P`` is the key prefix, default ``sluice:``)::

    P{events:<k>}            stream   partition k of the log, k = crc32(user id) mod N
    P{events:<k>}:u:<user>   set      that user's entry ids in partition k (for DeleteUser)

A user's events all go to one partition, so they stay in order; N partitions (a setting,
default 16) spread the log over the masters of a Redis Cluster, each partition being one hash
tag and so one slot. An entry holds ``id`` (event id), ``u``, ``i``, ``t``, ``ts``, ``q``,
``a`` (the user's experiment arms, "experiment=arm,…");
its stream id is the server's append time (``<ms>-<seq>``).

Appending (:meth:`RedisEventStream.append`): the batch's events are grouped by partition and
each partition's share is one script call (``XADD`` per event, with ``MINID ~`` trimming by
age, and the user index), atomic in its slot. The calls for one master go in one pipeline on
one connection; with ``wait_replicas > 0`` that pipeline ends with ``WAIT wait_replicas
wait_timeout_ms``, so the batch is acknowledged only once that many replicas hold it. A
master that cannot be reached, or a ``WAIT`` that times out short of its replicas, raises
:class:`StreamUnavailable` (Track answers UNAVAILABLE): what is not durable is never
acknowledged. Such a batch may still have been written in part; the client's retry carries
the same event ids, and applying is idempotent by event id, so it counts once.

Durability on each master comes from its AOF: ``appendonly yes`` with ``appendfsync always``
fsyncs every write before the reply (what the file log's ack means); ``everysec`` may lose
the last second of acknowledged writes if the machine (not only Redis) dies, unless WAIT made
a replica hold them. :func:`durability_warnings` reports a master that offers less.

Reading: :meth:`RedisEventStream.replay` reads every partition with ``XRANGE`` from a time on,
with its own cursor, and merges them by stream id: the consumer that needs every event (the
gateway's catch-up on start, which applies, idempotently, what a crashed gateway logged and
did not apply). Nothing consumes the stream continuously: the gateways share their state in
Redis and apply each batch before they acknowledge it.

Erasing (:meth:`RedisEventStream.erase_user`): one script per partition deletes (``XDEL``) the
entries its user index lists, and the index; erase markers are never indexed, so they stay.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from sluice.events.log import LogError
from sluice.events.model import Event, EventType
from sluice.state.store import (
    CLUSTER_SCHEMES,
    MOVED_ELSEWHERE,
    RedisClient,
    by_master,
    connect,
    redis_down,
    refresh_layout,
)

logger = logging.getLogger(__name__)

# KEYS[1]: the partition's stream. ARGV: retention ms, index TTL s, then seven per event:
# id, user, item, type, timestamp ms, query, experiment arms. TIME is the server clock, the
# one stream ids use.
_APPEND_LUA = """
local key = KEYS[1]
local now = redis.call('TIME')
local minid = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1])
local ttl = ARGV[2]
local ids = {}
for i = 3, #ARGV, 7 do
  local id = redis.call('XADD', key, 'MINID', '~', minid, '*', 'id', ARGV[i], 'u', ARGV[i + 1],
                        'i', ARGV[i + 2], 't', ARGV[i + 3], 'ts', ARGV[i + 4], 'q', ARGV[i + 5],
                        'a', ARGV[i + 6])
  if ARGV[i + 3] ~= '9' then  -- an erase marker is not indexed: it is never erased
    local index = key .. ':u:' .. ARGV[i + 1]
    redis.call('SADD', index, id)
    redis.call('EXPIRE', index, ttl)
  end
  ids[#ids + 1] = id
end
return ids
"""

# KEYS[1]: the partition's stream, KEYS[2]: the user's index in it.
_ERASE_LUA = """
local ids = redis.call('SMEMBERS', KEYS[2])
local gone = 0
for i = 1, #ids, 500 do
  gone = gone + redis.call('XDEL', KEYS[1], unpack(ids, i, math.min(i + 499, #ids)))
end
redis.call('DEL', KEYS[2])
return gone
"""


class StreamUnavailable(LogError):
    """Redis could not take the write durably now (down, failing over, or WAIT timed out)."""


@dataclass(frozen=True)
class StreamConfig:
    partitions: int = 16
    """Streams the log is split into, by user id (each one slot of a cluster)."""
    retention_s: float = 24 * 3600.0
    """Entries older than this are trimmed (``XADD ... MINID ~``) as new ones arrive."""
    wait_replicas: int = 0
    """``WAIT`` for this many replicas before an append returns; 0: no WAIT."""
    wait_timeout_ms: int = 100
    """How long ``WAIT`` may block; short of the replicas after it, the append fails."""
    prefix: str = "sluice:"
    read_chunk: int = 1000
    """Entries per ``XRANGE`` page when replaying."""

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError("partitions must be at least 1")
        if self.retention_s <= 0 or self.wait_timeout_ms < 1 or self.wait_replicas < 0:
            raise ValueError("retention_s, wait_timeout_ms must be positive; wait_replicas >= 0")
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError("the key prefix must not contain braces (Redis Cluster hash tags)")


def _fields(event: Event) -> list[str | int]:
    return [
        event.event_id,
        event.user_id,
        event.item_id,
        int(event.type),
        event.timestamp_ms,
        event.query,
        event.arms,
    ]


def decode_entry(fields: dict[str, str]) -> Event | None:
    """The event an entry holds; None for an entry this version cannot read."""
    try:
        return Event(
            fields["id"],
            fields["u"],
            int(fields["i"]),
            EventType(int(fields["t"])),
            int(fields["ts"]),
            fields.get("q", ""),
            fields.get("a", ""),  # entries written before arm labels have none
        )
    except (KeyError, ValueError):
        return None


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class RedisEventStream:
    """The durable event log on Redis Streams (one server or a Redis Cluster).

    Has what :class:`sluice.events.ingest.Ingestor` needs of a log (``append``,
    ``erase_user``, ``replay``, ``close`` and the counters :mod:`sluice.events.metrics`
    exports). Thread-safe.
    """

    def __init__(self, client: RedisClient, config: StreamConfig | None = None) -> None:
        self.config = config or StreamConfig()
        self._r: Any = cast(Any, client)  # (types-redis lacks part of RedisCluster)
        self._lock = threading.Lock()
        # Counters (cumulative), the file log's names; exported by sluice.events.metrics.
        self.commits = 0
        self.fsyncs = 0  # the Redis server fsyncs (its AOF), not this process
        self.records_written = 0
        self.bytes_written = 0
        self.commit_seconds_total = 0.0
        self.last_commit_records = 0
        self.max_commit_records = 0
        self.commit_ms_ewma = 0.0
        self.truncated_bytes = 0
        self.replica_waits = 0
        self.replica_shortfalls = 0
        self.entries_skipped = 0

    @classmethod
    def from_url(cls, url: str, config: StreamConfig | None = None) -> RedisEventStream:
        """``redis://...`` for one server, ``redis+cluster://host:port[,...]`` for a cluster.
        The socket timeout leaves room for ``WAIT``."""
        config = config or StreamConfig()
        options: dict[str, Any] = {
            "socket_timeout": 5.0 + config.wait_timeout_ms / 1000.0,
            "socket_connect_timeout": 2.0,
        }
        if url.partition("://")[0].lower() not in CLUSTER_SCHEMES:
            # redis-py would resend a whole pipeline after a timeout, appending it twice; the
            # cluster client never retries on a node's connection
            options["retry"] = Retry(NoBackoff(), 0)
        return cls(connect(url, **options), config)

    @property
    def client(self) -> Any:
        """The ``redis.Redis`` or ``redis.cluster.RedisCluster`` client."""
        return self._r

    # -- keys ------------------------------------------------------------------------

    def partition(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % self.config.partitions

    def key(self, partition: int) -> str:
        return f"{self.config.prefix}{{events:{partition}}}"

    def index_key(self, partition: int, user_id: str) -> str:
        """The user's entry ids in a partition (the stream's slot: its tag comes first)."""
        return f"{self.key(partition)}:u:{user_id}"

    # -- writing ---------------------------------------------------------------------

    def _run(self, calls: list[tuple[str, list[str], list[Any]]], what: str) -> list[Any]:
        """Run ``(script, keys, args)`` calls, each in its keys' slot: one pipeline per master,
        ending with ``WAIT`` where configured; return each call's result, in order. A call
        the node refused because its slot moved is sent again where it now lives; a node
        that cannot be reached, or a WAIT short of its replicas, raises StreamUnavailable."""
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(3):
            rerun: list[int] = []
            try:
                for client, positions in by_master(self._r, [calls[i][1][0] for i in pending]):
                    todo = [pending[p] for p in positions]
                    rerun += self._run_on(client, calls, todo, results, what)
            except StreamUnavailable:
                raise
            except Exception as exc:  # redis-py's errors, RedisClusterException, OSError
                if not (redis_down(exc) or isinstance(exc, OSError)):
                    raise
                self._refresh_quietly()
                raise StreamUnavailable(f"event stream unavailable ({what}): {exc}") from exc
            if not rerun:
                return results
            pending = sorted(rerun)
            logger.info("event stream slots moved; re-routing", extra={"attempt": attempt + 1})
            self._refresh_quietly()
        raise StreamUnavailable(f"event stream unavailable ({what}): its slots keep moving")

    def _run_on(
        self,
        client: Any,
        calls: list[tuple[str, list[str], list[Any]]],
        indexes: list[int],
        results: list[Any],
        what: str,
    ) -> list[int]:
        """One master's calls on one connection (then WAIT); return those to re-route."""
        pipe = client.pipeline(transaction=False)
        for i in indexes:
            script, keys, args = calls[i]
            pipe.execute_command("EVAL", script, len(keys), *keys, *args)
        wait = self.config.wait_replicas
        if wait:
            pipe.execute_command("WAIT", wait, self.config.wait_timeout_ms)
        replies = pipe.execute(raise_on_error=False)
        rerun = []
        for i, reply in zip(indexes, replies, strict=False):
            if isinstance(reply, MOVED_ELSEWHERE):
                rerun.append(i)  # not run: MOVED, ASK, TRYAGAIN, CLUSTERDOWN or READONLY
            elif isinstance(reply, Exception):
                raise reply
            else:
                results[i] = reply
        if wait:
            acked = replies[-1]
            if isinstance(acked, Exception):
                raise acked
            self.replica_waits += 1
            if int(acked) < wait and len(rerun) < len(indexes):
                self.replica_shortfalls += 1
                raise StreamUnavailable(
                    f"event stream {what}: {acked} of {wait} replicas acknowledged within "
                    f"{self.config.wait_timeout_ms} ms; not durable, not acknowledged"
                )
        return rerun

    def _refresh_quietly(self) -> None:
        try:
            refresh_layout(self._r)
        except Exception as exc:  # no node answers: the next call tries again
            if not (redis_down(exc) or isinstance(exc, OSError)):
                raise
            logger.warning("event stream: cluster layout not refreshed", extra={"error": str(exc)})

    def append(self, events: Sequence[Event], *, timeout: float | None = None) -> None:
        """Append ``events`` and return once Redis holds them durably (see the module doc);
        raise :class:`StreamUnavailable` otherwise. ``timeout`` is not used: the client's
        socket timeout and ``wait_timeout_ms`` bound the call."""
        if not events:
            return
        by_partition: dict[int, list[Event]] = {}
        for event in events:
            by_partition.setdefault(self.partition(event.user_id), []).append(event)
        cfg = self.config
        head = [int(cfg.retention_s * 1000), int(cfg.retention_s) + 1]
        calls: list[tuple[str, list[str], list[Any]]] = []
        size = 0
        for partition, share in by_partition.items():
            args: list[Any] = [*head]
            for event in share:
                fields = _fields(event)
                args += fields
                size += sum(len(str(f)) for f in fields)
            calls.append((_APPEND_LUA, [self.key(partition)], args))
        started = time.perf_counter()
        self._run(calls, "append")
        elapsed = time.perf_counter() - started
        with self._lock:
            self.commits += 1
            self.records_written += len(events)
            self.bytes_written += size
            self.commit_seconds_total += elapsed
            self.last_commit_records = len(events)
            self.max_commit_records = max(self.max_commit_records, len(events))
            self.commit_ms_ewma = 0.8 * self.commit_ms_ewma + 0.2 * elapsed * 1000.0

    def erase_user(self, user_id: str) -> int:
        """Delete the user's entries (not their erase markers) from every partition; return
        how many went. Everything appended before the call is covered; a partition count
        changed since those appends does not hide any (every partition is searched)."""
        calls: list[tuple[str, list[str], list[Any]]] = [
            (_ERASE_LUA, [self.key(k), self.index_key(k, user_id)], [])
            for k in range(self.config.partitions)
        ]
        removed = sum(int(n or 0) for n in self._run(calls, "erase"))
        logger.info("user erased from the event stream", extra={"records": removed})
        return removed

    # -- reading ---------------------------------------------------------------------

    def _partition_entries(
        self, partition: int, start: str
    ) -> Iterator[tuple[tuple[int, int], Event]]:
        key = self.key(partition)
        chunk = self.config.read_chunk
        while True:
            try:
                page = self._r.xrange(key, min=start, max="+", count=chunk)
            except redis.RedisError as exc:
                if not redis_down(exc):
                    raise
                raise StreamUnavailable(f"event stream unavailable (replay): {exc}") from exc
            for entry_id, fields in page:
                event = decode_entry(fields)
                if event is None:
                    self.entries_skipped += 1
                    logger.warning("unreadable event stream entry", extra={"entry": entry_id})
                    continue
                yield _stream_id(entry_id), event
            if len(page) < chunk:
                return
            start = "(" + page[-1][0]  # exclusive: after the last one read

    def replay(self, since_ms: int | None = None) -> Iterator[Event]:
        """Every entry appended (server clock) at or after ``since_ms``, all partitions merged
        in stream-id order; one user's events in the order they were appended."""
        start = "-" if since_ms is None else str(max(since_ms, 0))
        streams = [self._partition_entries(k, start) for k in range(self.config.partitions)]
        for _, event in heapq.merge(*streams, key=lambda pair: pair[0]):
            yield event

    def length(self) -> int:
        """Entries in all partitions (trimming is approximate: may exceed the retention)."""
        pipe = self._r.pipeline(transaction=False)
        for k in range(self.config.partitions):
            pipe.xlen(self.key(k))
        return sum(int(n) for n in pipe.execute())

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> RedisEventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def durability_warnings(client: RedisClient) -> list[str]:
    """What each master's persistence falls short of for an acknowledged event: no AOF, or
    an fsync policy other than ``always``. Nothing where ``CONFIG GET`` is not allowed."""
    any_client: Any = client
    masters: list[tuple[str, Any]]
    try:
        if isinstance(client, RedisCluster):
            primaries = any_client.get_primaries()
            masters = [(n.name, any_client.get_redis_connection(n)) for n in primaries]
        else:
            masters = [("redis", client)]
    except Exception as exc:
        if not redis_down(exc):
            raise
        return [f"could not check persistence: {exc}"]
    warnings = []
    for name, node in masters:
        try:
            config = node.config_get("append*")
        except redis.ResponseError as exc:
            if redis_down(exc):
                warnings.append(f"{name}: could not check persistence: {exc}")
            continue  # CONFIG is disabled (managed Redis): nothing to tell
        except redis.RedisError as exc:
            if not redis_down(exc):
                raise
            warnings.append(f"{name}: could not check persistence: {exc}")
            continue
        if config.get("appendonly") != "yes":
            warnings.append(f"{name}: appendonly is off: an acknowledged event lives in memory")
        elif config.get("appendfsync") == "everysec":
            warnings.append(f"{name}: appendfsync everysec: up to 1 s of acknowledged events")
        elif config.get("appendfsync") != "always":
            warnings.append(f"{name}: appendfsync {config.get('appendfsync')}: the OS decides")
    return warnings
