"""The shared event log and state on a real Redis Cluster, end to end.

* ``test_a_master_failover_loses_no_acknowledged_event`` (default run, about 10 s): three
  masters with one replica each and ``appendfsync always``; Track's path (the ingestor on
  Redis Streams with ``WAIT 1``, and the Redis state) runs under load while one master is
  killed with SIGKILL and its replica takes over; every event acknowledged, before and after,
  is in the stream, and once the stream's tail is replayed, applied exactly once.
* ``slow`` (skipped unless ``-m slow``; about a minute: two more gateway processes): two
  gateways with ``event_log=redis`` over one Redis Cluster, in front of the package's stage
  services; what one acknowledged shapes the other's next answer, DeleteUser through one
  erases what the other logged, and Redis refusing writes makes Track UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sluice.core.errors import Unavailable
from sluice.events.ingest import Ingestor
from sluice.events.model import Event, EventStatus, EventType, now_ms
from sluice.events.stream import RedisEventStream, StreamConfig, durability_warnings
from sluice.launch import Cluster, free_ports
from sluice.state.store import RedisStateStore
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.redis_fixture import RedisClusterServer, start_redis_cluster, wait_until

ATTRS = {i: (f"cat{i % 3}", f"brand{i % 2}") for i in range(1, 200)}
SHORTFALL = "not durable, not acknowledged"


# -- failover ----------------------------------------------------------------------------------


@pytest.fixture
def durable_cluster(tmp_path: Path) -> Iterator[RedisClusterServer]:
    cluster = start_redis_cluster(
        tmp_path / "redis", masters=3, replicas=1, appendfsync="always", node_timeout_ms=3000
    )
    yield cluster
    cluster.stop()


class TrackLoad:
    """One client sending batches through an ingestor; a failed batch is sent again, as it
    is, until acknowledged (what a storefront backend does)."""

    def __init__(self, ingestor: Ingestor, users: int = 40, batch: int = 20) -> None:
        self.ingestor = ingestor
        self.users = users
        self.batch = batch
        self.acked: list[Event] = []
        self.failures = 0
        self.reasons: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="track-load", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> TrackLoad:
        self._thread.start()
        return self

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                events = [
                    Event(
                        f"e{n + k}",
                        f"user{(n + k) % self.users}",
                        1 + (n + k) % 150,
                        EventType.CLICK,
                        now_ms(),
                    )
                    for k in range(self.batch)
                ]
                n += self.batch
                while not self._stop.is_set():  # until acknowledged
                    try:
                        results = self.ingestor.track(events)
                    except Unavailable as exc:
                        self.failures += 1
                        self.reasons["shortfall" if SHORTFALL in str(exc) else "other"] += 1
                        continue
                    assert {r.status for r in results} <= {
                        EventStatus.ACCEPTED,
                        EventStatus.DUPLICATE,  # a retry of a batch written in part
                    }
                    with self._lock:
                        self.acked += events
                    break
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.mark.integration
def test_a_master_failover_loses_no_acknowledged_event(
    durable_cluster: RedisClusterServer,
) -> None:
    stream = RedisEventStream.from_url(
        durable_cluster.url, StreamConfig(wait_replicas=1, wait_timeout_ms=1000)
    )
    store = RedisStateStore.from_url(durable_cluster.url, ATTRS)
    try:
        assert durability_warnings(stream.client) == []  # AOF with appendfsync always
        load = TrackLoad(Ingestor(stream, store)).start()
        try:
            wait_until(lambda: load.count >= 400 or load.error is not None, "load", 60)
            # the master that holds popularity (so Track stops entirely) and some partitions
            victim = next(
                n
                for n in durable_cluster.masters()
                if store.client.get_node_from_key(store.popularity_key("meta")).port == n.port
            )
            replica = durable_cluster.replica_of(victim)
            durable_cluster.kill(victim)
            acked_before_kill = load.count
            durable_cluster.take_over(replica)
            # The promoted replica has no replica of its own: WAIT 1 cannot be met on its
            # shard, so Track keeps answering UNAVAILABLE rather than acknowledge what one
            # more failure would lose...
            wait_until(lambda: load.reasons["shortfall"] >= 2, "Track refuses without a replica")
            stuck = load.count
            wait_until(lambda: load.reasons["shortfall"] >= 4, "Track still refuses")
            assert load.count == stuck
            # ...until the old master is back, as a replica of its successor.
            durable_cluster.restart(victim)
            assert durable_cluster.role(victim) == ("slave", replica.port)
            wait_until(
                lambda: load.count >= acked_before_kill + 400 or load.error is not None,
                "Track acknowledges again after the failover",
                60,
            )
        finally:
            load.finish()
        acked = load.acked
        print(
            f"\n{len(acked)} events acknowledged, {acked_before_kill} before the kill; "
            f"{load.failures} Track calls failed during the failover and were sent again; "
            f"{stream.replica_waits} WAITs"
        )
        assert load.failures > 0  # the failover was felt
        # The log holds every acknowledged event (the kill lost none of them).
        logged = Counter(e.event_id for e in stream.replay())
        assert [e.event_id for e in acked if e.event_id not in logged] == []
        # The state is derived: writes the dead master had not yet passed on may be gone
        # with it; replaying the log's tail (a restarted gateway does) restores them, once.
        Ingestor(stream, store).recover()
        assert all(store.seen_many([e.event_id for e in acked]))
        sent: dict[str, list[int]] = {}
        for e in acked:
            sent.setdefault(e.user_id, []).append(e.item_id)
        for user, items in sent.items():
            assert Counter(store.history(user)) == Counter(items), user
        # every click counted once: 2 each, decayed to the store clock (the newest event)
        clock, half_life = max(e.timestamp_ms for e in acked), 24 * 3600 * 1000
        expected = sum(2.0 * 2 ** (-(clock - e.timestamp_ms) / half_life) for e in acked)
        total = sum(score for _, score in store.top_popular(200))
        assert total == pytest.approx(expected, rel=1e-9)
    finally:
        stream.close()
        store.close()


# -- two gateways (slow) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    cluster = start_redis_cluster(tmp_path_factory.mktemp("shared-redis"), appendfsync="always")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def gateways(
    cluster: Cluster, shared_redis: RedisClusterServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Cluster]]:
    """Two gateway processes with event_log=redis over one Redis Cluster, in front of the
    package's stage services (only the gateway is in each one's ``processes``)."""
    started: list[Cluster] = []
    try:
        for name in ("a", "b"):
            base = tmp_path_factory.mktemp(f"gateway-{name}")
            gateway_port, metrics_port = free_ports(2)
            ports = dataclasses.replace(
                cluster.ports,
                gateway=gateway_port,
                metrics={**cluster.ports.metrics, "gateway": metrics_port},
            )
            one = Cluster(
                artifacts=cluster.artifacts,
                ports=ports,
                log_dir=base / "logs",
                event_log_dir=base / "events",
                state="redis",
                redis_url=shared_redis.url,
                extra_env={"SLUICE_GATEWAY_EVENT_LOG": "redis"},
            )
            one.start_process("gateway")
            started.append(one)
        for one in started:
            one.wait_serving("gateway", timeout_s=240)
        yield started
    finally:
        for one in started:
            one.stop()


def _stub(gateway: Cluster) -> tuple[grpc.Channel, storefront_pb2_grpc.StorefrontServiceStub]:
    channel = grpc.insecure_channel(gateway.gateway_address)
    return channel, storefront_pb2_grpc.StorefrontServiceStub(channel)


def _similar(stub: storefront_pb2_grpc.StorefrontServiceStub, user: str, anchor: int) -> list[int]:
    req = storefront_pb2.RecommendRequest(
        user_id=user,
        surface=storefront_pb2.SURFACE_SIMILAR_ITEMS,
        context_item_id=anchor,
        page_size=20,
    )
    return list(stub.Recommend(req, timeout=10).page.item_ids)


def _clicks(user: str, items: Sequence[int]) -> list[storefront_pb2.Event]:
    return [
        storefront_pb2.Event(
            event_id=uuid.uuid4().hex,
            user_id=user,
            item_id=item,
            type=storefront_pb2.EVENT_TYPE_CLICK,
        )
        for item in items
    ]


@pytest.mark.integration
@pytest.mark.slow
def test_what_one_gateway_acknowledged_shapes_the_other_gateways_answer(
    gateways: list[Cluster], shared_redis: RedisClusterServer
) -> None:
    (ch_a, a), (ch_b, b) = _stub(gateways[0]), _stub(gateways[1])
    try:
        user = f"shopper-{uuid.uuid4().hex[:8]}"
        anchor = _any_item(b)
        similar = _similar(b, user, anchor)[:5]
        assert len(similar) == 5
        resp = a.Track(storefront_pb2.TrackRequest(events=_clicks(user, similar)), timeout=30)
        assert set(resp.statuses) == {storefront_pb2.EVENT_STATUS_ACCEPTED}
        # the very next answer of the other gateway leaves out what the user just saw
        assert not set(_similar(b, user, anchor)) & set(similar)
        # DeleteUser through B erases what A logged: the stream keeps only the marker
        erased = b.DeleteUser(storefront_pb2.DeleteUserRequest(user_id=user), timeout=30)
        assert erased.erased_events == len(similar)
        stream = RedisEventStream.from_url(shared_redis.url)
        try:
            mine = [(e.user_id, e.type) for e in stream.replay() if e.user_id == user]
        finally:
            stream.close()
        assert mine == [(user, EventType.ERASE)]
        assert set(similar) <= set(_similar(a, user, anchor))  # no history any more
    finally:
        ch_a.close()
        ch_b.close()


def _any_item(stub: storefront_pb2_grpc.StorefrontServiceStub) -> int:
    """An item the catalog has: the first of a new shopper's home page."""
    req = storefront_pb2.RecommendRequest(
        user_id="", surface=storefront_pb2.SURFACE_HOME, page_size=1
    )
    return int(stub.Recommend(req, timeout=10).page.item_ids[0])


@pytest.mark.integration
@pytest.mark.slow
def test_track_is_unavailable_while_redis_refuses_writes(
    gateways: list[Cluster], shared_redis: RedisClusterServer
) -> None:
    channel, stub = _stub(gateways[0])
    clients = [n.client() for n in shared_redis.masters()]
    events = _clicks(f"shopper-{uuid.uuid4().hex[:8]}", [_any_item(stub)])
    try:
        for c in clients:  # writes wait; the stream's socket timeout (5 s) ends the wait
            c.execute_command("CLIENT PAUSE", 20_000, "WRITE")
        with pytest.raises(grpc.RpcError) as info:
            stub.Track(storefront_pb2.TrackRequest(events=events), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "event log unavailable" in (info.value.details() or "")
        status = rpc_status.from_call(info.value)
        assert status is not None
        reasons = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                reasons.append(error_info.reason)
        assert reasons == ["UNAVAILABLE"]
    finally:
        for c in clients:
            c.execute_command("CLIENT UNPAUSE")
            c.close()
    # the client sends the batch again, as it is: acknowledged, applied once
    resp = stub.Track(storefront_pb2.TrackRequest(events=events), timeout=30)
    assert list(resp.statuses) == [storefront_pb2.EVENT_STATUS_ACCEPTED]
    channel.close()
