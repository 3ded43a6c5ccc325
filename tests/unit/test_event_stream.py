"""The event log on Redis Streams (``sluice.events.stream``), on one server and on a cluster:
append and replay, acknowledgement only when durable, erasure, trimming, and Track's path
through the ingestor with the shared Redis state."""

from __future__ import annotations

import itertools
import socket

import pytest
import redis
from redis.cluster import RedisCluster
from tests.redis_fixture import wait_until

from sluice.core.errors import Unavailable
from sluice.events.ingest import Ingestor
from sluice.events.model import Event, EventStatus, EventType, now_ms
from sluice.events.stream import (
    RedisEventStream,
    StreamConfig,
    StreamUnavailable,
    decode_entry,
    durability_warnings,
)
from sluice.state.store import RedisStateStore

ATTRS = {i: (f"cat{i % 3}", f"brand{i % 2}") for i in range(1, 100)}
ACCEPTED, DUPLICATE = EventStatus.ACCEPTED, EventStatus.DUPLICATE
_prefixes = itertools.count()
AnyRedis = redis.Redis | RedisCluster


def ev(eid: str, user: str = "u", item: int = 1, kind: EventType = EventType.VIEW) -> Event:
    return Event(eid, user, item, kind, now_ms(), query=f"q-{eid}" if item % 2 else "")


@pytest.fixture(params=["redis", "redis-cluster"])
def client(request: pytest.FixtureRequest) -> AnyRedis:
    """A flushed client of one Redis server, then of a 3-master Redis Cluster."""
    name = "redis_client" if request.param == "redis" else "redis_cluster_client"
    found: AnyRedis = request.getfixturevalue(name)
    return found


def open_stream(client: AnyRedis, **config: object) -> RedisEventStream:
    prefix = f"s{next(_prefixes)}:"
    return RedisEventStream(client, StreamConfig(prefix=prefix, **config))  # type: ignore[arg-type]


@pytest.fixture
def stream(client: AnyRedis) -> RedisEventStream:
    return open_stream(client, partitions=8)


def test_append_then_replay_keeps_each_users_order(stream: RedisEventStream) -> None:
    users = [f"user-{n}" for n in range(12)]
    sent: dict[str, list[Event]] = {u: [] for u in users}
    for batch in range(5):
        events = [ev(f"{u}-{batch}-{k}", u, 1 + k) for u in users for k in range(3)]
        stream.append(events)
        for e in events:
            sent[e.user_id].append(e)
    assert stream.commits == 5 and stream.records_written == 12 * 15
    replayed = list(stream.replay())
    assert len(replayed) == 12 * 15
    for u in users:
        assert [e for e in replayed if e.user_id == u] == sent[u]  # whole events, in order
    assert len({stream.partition(u) for u in users}) > 1  # spread over partitions
    assert stream.length() == 12 * 15


def test_partitions_live_on_every_master(redis_cluster_client: RedisCluster) -> None:
    stream = open_stream(redis_cluster_client, partitions=16)
    nodes = set()
    for k in range(16):
        node = redis_cluster_client.get_node_from_key(stream.key(k))
        assert node is not None
        nodes.add(node.name)
    assert len(nodes) == 3
    # a user's index shares its partition's slot (erasure is one atomic script)
    for k in range(16):
        key, index = stream.key(k), stream.index_key(k, "{odd}user")
        assert redis_cluster_client.keyslot(key) == redis_cluster_client.keyslot(index)


def test_replay_since_keeps_what_was_appended_from_then_on(stream: RedisEventStream) -> None:
    stream.append([ev("old-1", "a"), ev("old-2", "b")])
    latest = max(
        int(rows[0][0].split("-")[0])
        for k in range(stream.config.partitions)
        if (rows := stream.client.xrevrange(stream.key(k), count=1))
    )
    since = latest + 1
    wait_until(lambda: _server_ms(stream.client) >= since, "the server clock moves on")
    stream.append([ev("new-1", "a"), ev("new-2", "c")])
    # (across users, entries appended within one millisecond have no defined order)
    assert sorted(e.event_id for e in stream.replay(since_ms=since)) == ["new-1", "new-2"]
    assert sorted(e.event_id for e in stream.replay(since_ms=0))[2:] == ["old-1", "old-2"]


def _server_ms(client: AnyRedis) -> int:
    if isinstance(client, RedisCluster):
        client = client.get_redis_connection(client.get_primaries()[0])
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_replay_pages_through_long_partitions(client: AnyRedis) -> None:
    stream = RedisEventStream(client, StreamConfig(partitions=2, read_chunk=7, prefix="pg:"))
    events = [ev(f"e{i}", f"u{i % 5}", 1 + i % 9) for i in range(100)]
    for i in range(0, 100, 30):
        stream.append(events[i : i + 30])
    assert sorted(e.event_id for e in stream.replay()) == sorted(e.event_id for e in events)


def test_without_the_replicas_asked_for_nothing_is_acknowledged(
    client: AnyRedis,
) -> None:
    """These Redis servers have no replicas: WAIT 1 times out, so the append must fail
    (UNAVAILABLE at Track), never return as if durable."""
    stream = open_stream(client, wait_replicas=1, wait_timeout_ms=20)
    with pytest.raises(StreamUnavailable, match="0 of 1 replicas"):
        stream.append([ev("a"), ev("b", "v")])
    assert stream.replica_shortfalls >= 1
    assert stream.commits == 0
    store = RedisStateStore(client, ATTRS, prefix=stream.config.prefix)
    ingestor = Ingestor(stream, store)
    with pytest.raises(Unavailable, match="replicas"):
        ingestor.track([ev("c")])
    assert store.history("u") == [] and not store.seen("c")  # not applied either
    assert ingestor.in_flight == 0


def test_an_unreachable_redis_is_unavailable() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = RedisEventStream.from_url(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StreamUnavailable):
        stream.append([ev("a")])
    with pytest.raises(StreamUnavailable):
        stream.erase_user("u")
    with pytest.raises(StreamUnavailable):
        list(stream.replay())
    assert "could not check" in durability_warnings(stream.client)[0]
    stream.close()


def test_erasing_a_user_deletes_their_entries_and_keeps_markers(stream: RedisEventStream) -> None:
    stream.append([ev(f"u{k}", "u", 1 + k) for k in range(4)] + [ev("v0", "v", 2)])
    stream.append([ev("u-late", "u", 3), ev("v1", "v", 4)])
    assert stream.erase_user("u") == 5
    assert stream.erase_user("u") == 0  # idempotent
    assert [e.event_id for e in stream.replay()] == ["v0", "v1"]  # one user: in order
    stream.append([ev("u-new", "u", 5)])  # new data after the erasure is kept
    assert [e.event_id for e in stream.replay() if e.user_id == "u"] == ["u-new"]


def test_trimming_by_age_drops_old_entries(client: AnyRedis) -> None:
    stream = RedisEventStream(client, StreamConfig(partitions=1, retention_s=0.05, prefix="tr:"))
    stream.append([ev(f"old{i}", f"u{i}") for i in range(500)])
    oldest_kept = _server_ms(client) + 60
    wait_until(lambda: _server_ms(client) > oldest_kept, "the old entries age out")
    stream.append([ev("new", "x")])
    # MINID ~ drops whole stream nodes (100 entries each) that are entirely too old
    assert stream.length() <= 101
    assert [e.event_id for e in stream.replay()][-1] == "new"


def test_durability_warnings_name_a_master_without_aof(
    redis_client: redis.Redis, redis_cluster_client: RedisCluster
) -> None:
    """The test servers run without AOF (the failover test checks a cluster that has it)."""
    warnings = durability_warnings(redis_client)
    assert len(warnings) == 1 and "appendonly is off" in warnings[0]
    assert len(durability_warnings(redis_cluster_client)) == 3  # one per master


def test_unreadable_entries_are_skipped(stream: RedisEventStream) -> None:
    assert decode_entry({"id": "x", "u": "u", "i": "one", "t": "1", "ts": "5"}) is None
    assert decode_entry({"id": "x"}) is None
    stream.client.xadd(stream.key(stream.partition("u")), {"garbage": "1"})
    stream.append([ev("a")])
    assert [e.event_id for e in stream.replay()] == ["a"]
    assert stream.entries_skipped == 1


# -- Track's path: the ingestor on the stream and the shared state -----------------------------


@pytest.fixture
def shared(client: AnyRedis) -> tuple[RedisEventStream, RedisStateStore]:
    stream = open_stream(client, partitions=4)
    return stream, RedisStateStore(client, ATTRS, prefix=stream.config.prefix)


def test_two_ingestors_share_one_log_and_one_state(
    shared: tuple[RedisEventStream, RedisStateStore],
) -> None:
    """Two gateways: what one acknowledged, the other sees, and sent again through the other
    it is a duplicate."""
    stream, store = shared
    one, two = Ingestor(stream, store), Ingestor(stream, store)
    batch = [ev("a", "u", 1, EventType.PURCHASE), ev("b", "u", 2), ev("c", "w", 3)]
    assert [r.status for r in one.track(batch)] == [ACCEPTED] * 3
    assert [r.status for r in two.track(batch)] == [DUPLICATE] * 3
    assert store.history("u") == [1, 2] and store.suppressed("u") == frozenset({1})
    assert sorted(e.event_id for e in stream.replay()) == ["a", "b", "c"]  # logged once


def test_recovery_applies_what_was_logged_and_not_applied(
    shared: tuple[RedisEventStream, RedisStateStore],
) -> None:
    stream, store = shared
    ingestor = Ingestor(stream, store)
    ingestor.track([ev("a", "u", 1), ev("b", "u", 2)])
    stream.append([ev("c", "u", 3)])  # logged; the gateway died before applying it
    restarted = Ingestor(stream, store)
    assert restarted.recover() == 1
    assert restarted.recover() == 0
    assert store.history("u") == [1, 2, 3]
    assert [r.status for r in restarted.track([ev("c", "u", 3)])] == [DUPLICATE]


def test_delete_user_erases_the_stream_and_the_state(
    shared: tuple[RedisEventStream, RedisStateStore],
) -> None:
    stream, store = shared
    ingestor = Ingestor(stream, store)
    ingestor.track([ev(f"u{k}", "u", 1 + k) for k in range(3)] + [ev("v0", "v", 9)])
    assert ingestor.delete_user("u") == 3
    assert store.history("u") == [] and store.erased("u") and store.history("v") == [9]
    logged = [(e.user_id, e.type) for e in stream.replay()]
    assert logged == [("v", EventType.VIEW), ("u", EventType.ERASE)]  # the marker stays
    # a fresh state rebuilt from the stream erases them again
    rebuilt = RedisStateStore(stream.client, ATTRS, prefix="rebuilt:" + stream.config.prefix)
    Ingestor(stream, rebuilt).recover()
    assert rebuilt.erased("u") and rebuilt.history("v") == [9]


def test_experiment_arm_labels_ride_with_the_entries(stream: RedisEventStream) -> None:
    labelled = Event("lab-1", "u-arms", 3, EventType.PURCHASE, now_ms(), "", "mmr=b,fusion=a")
    stream.append([labelled, ev("lab-2", "u-arms")])
    got = {e.event_id: e for e in stream.replay()}
    assert got["lab-1"] == labelled and got["lab-2"].arms == ""
    # an entry written before labels existed reads with none
    old = {"id": "x", "u": "u", "i": "1", "t": "1", "ts": "5", "q": ""}
    assert decode_entry(old) == Event("x", "u", 1, EventType.VIEW, 5, "", "")
