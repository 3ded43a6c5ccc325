"""Real-time personalisation end to end: Track over gRPC moves the next Recommend.

Two clusters of real processes (Triton and the five services), module-scoped so
that the kill -9 tests here disturb no other module:

* ``redis_cluster`` — the production store: the gateway writes the shared
  Redis state and recall blends live popularity from it. Its gateway gets a
  small in-flight budget (``SLUICE_GATEWAY_TRACK_MAX_IN_FLIGHT=1000``, the
  smallest allowed, one full batch) so that the backpressure test can make
  ingestion fall behind with concurrent full batches.
* ``embedded_cluster`` — a gateway on the in-process store (rebuilt from the
  event log on start) in front of the same stage services; used where that
  matters: durability across kill -9.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sluice.artifacts import Artifacts
from sluice.launch import Cluster, Ports, free_ports
from sluice.state.store import RedisStateStore
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.integration

CLICK = storefront_pb2.EVENT_TYPE_CLICK
PURCHASE = storefront_pb2.EVENT_TYPE_PURCHASE
ACCEPTED = storefront_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = storefront_pb2.EVENT_STATUS_DUPLICATE
REJECTED = storefront_pb2.EVENT_STATUS_REJECTED
# A killed gateway comes back within seconds: reconnect quickly instead of backing off to 2 min.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# -- clients and helpers -----------------------------------------------------------------


class Storefront:
    """The gateway over gRPC (its own channel, quick to reconnect after a kill)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = storefront_pb2_grpc.StorefrontServiceStub(self.channel)

    def track(
        self, events: Sequence[storefront_pb2.Event], timeout: float = 30.0
    ) -> storefront_pb2.TrackResponse:
        resp: storefront_pb2.TrackResponse = self.stub.Track(
            storefront_pb2.TrackRequest(events=events), timeout=timeout
        )
        return resp

    def recommend(
        self, user_id: str, page_size: int = 20, context_item_id: int = 0, page_token: str = ""
    ) -> storefront_pb2.RecommendResponse:
        surface = (
            storefront_pb2.SURFACE_SIMILAR_ITEMS if context_item_id else storefront_pb2.SURFACE_HOME
        )
        req = storefront_pb2.RecommendRequest(
            user_id=user_id,
            surface=surface,
            context_item_id=context_item_id,
            page_size=page_size,
            page_token=page_token,
        )
        resp: storefront_pb2.RecommendResponse = self.stub.Recommend(req, timeout=10)
        return resp

    def items(self, user_id: str, page_size: int = 20, context_item_id: int = 0) -> list[int]:
        return list(self.recommend(user_id, page_size, context_item_id).page.item_ids)

    def two_pages(self, user_id: str, page_size: int = 10) -> tuple[list[int], list[int]]:
        first = self.recommend(user_id, page_size)
        assert first.next_page_token
        second = self.recommend(user_id, page_size, page_token=first.next_page_token)
        return list(first.page.item_ids), list(second.page.item_ids)

    def close(self) -> None:
        self.channel.close()


def event(
    event_id: str,
    user_id: str,
    item_id: int,
    kind: storefront_pb2.EventType = CLICK,
    timestamp_ms: int = 0,
) -> storefront_pb2.Event:
    return storefront_pb2.Event(
        event_id=event_id, user_id=user_id, item_id=item_id, type=kind, timestamp_ms=timestamp_ms
    )


def tag() -> str:
    return uuid.uuid4().hex[:10]


def status_of(err: grpc.RpcError) -> tuple[list[str], int | None, str]:
    """(BadRequest fields, RetryInfo delay in ms, ErrorInfo reason) of a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, "error carries no google.rpc.Status"
    fields: list[str] = []
    delay: int | None = None
    reason = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.ToMilliseconds()
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            reason = error_info.reason
    return fields, delay, reason


def start_cluster(artifacts: Artifacts, base: Path, **kwargs: object) -> Cluster:
    cluster = Cluster(
        artifacts=artifacts.root,
        ports=Ports.random(),
        log_dir=base / "logs",
        event_log_dir=base / "events",
        **kwargs,  # type: ignore[arg-type]
    )
    return cluster.start(timeout_s=240)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster(
    tiny_artifacts: Artifacts, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with redis.Redis.from_url(redis_server.url) as r:
        r.flushdb()  # live popularity is global: start from an empty store
    cluster = start_cluster(
        tiny_artifacts,
        tmp_path_factory.mktemp("rt-redis"),
        state="redis",
        redis_url=redis_server.url,
        extra_env={"SLUICE_GATEWAY_TRACK_MAX_IN_FLIGHT": "1000"},
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def embedded_cluster(
    redis_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A second gateway, on the embedded store, in front of the same stage services.

    With the embedded store the gateway is the only process that holds state (rebuilt
    from its own event log on start), so this is the embedded deployment as far as
    durability goes, without starting a second Triton and four more services on this
    small machine. Only the gateway is in ``processes``: ``stop`` stops just that one.
    """
    base = tmp_path_factory.mktemp("rt-embedded")
    gateway_port, metrics_port = free_ports(2)
    ports = dataclasses.replace(
        redis_cluster.ports,
        gateway=gateway_port,
        metrics={**redis_cluster.ports.metrics, "gateway": metrics_port},
    )
    cluster = Cluster(
        artifacts=redis_cluster.artifacts,
        ports=ports,
        log_dir=base / "logs",
        event_log_dir=base / "events",
        state="embedded",
    )
    cluster.log_dir.mkdir(parents=True)
    try:
        cluster._start_service("gateway")
        cluster._wait_health("gateway", ports.gateway, time.monotonic() + 180)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shop(redis_cluster: Cluster) -> Iterator[Storefront]:
    client = Storefront(redis_cluster.gateway_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def state(redis_server: RedisServer) -> Iterator[RedisStateStore]:
    """The gateway's Redis state, read directly to check exact history contents."""
    store = RedisStateStore.from_url(redis_server.url)
    yield store
    store.close()


# -- Track semantics -------------------------------------------------------------------


def test_a_partly_bad_batch_gets_one_result_per_event(
    shop: Storefront, state: RedisStateStore, tiny_artifacts: Artifacts
) -> None:
    items = tiny_artifacts.catalog.item_ids
    t, user = tag(), f"track-{tag()}"
    future = time.time_ns() // 1_000_000 + 3_600_000
    batch = [
        event(f"{t}-ok1", user, int(items[0])),
        event(f"{t}-unknown", user, 999_999_999),
        event(f"{t}-nouser", "", int(items[1])),
        event(f"{t}-notype", user, int(items[1]), storefront_pb2.EVENT_TYPE_UNSPECIFIED),
        event(f"{t}-future", user, int(items[1]), CLICK, future),
        event(f"{t}-ok2", user, int(items[2]), PURCHASE),
    ]
    resp = shop.track(batch)
    assert list(resp.statuses) == [ACCEPTED, REJECTED, REJECTED, REJECTED, REJECTED, ACCEPTED]
    errors = list(resp.errors)
    assert errors[0] == errors[5] == ""
    assert "not in the catalog" in errors[1]
    assert "user_id is empty" in errors[2]
    assert "unknown event type 0" in errors[3]
    assert "in the future" in errors[4]
    assert state.history(user) == [int(items[0]), int(items[2])]

    # The same ids again: acknowledged as duplicates and not applied twice.
    again = shop.track(batch)
    assert list(again.statuses) == [DUPLICATE, REJECTED, REJECTED, REJECTED, REJECTED, DUPLICATE]
    both = shop.track([event(f"{t}-ok3", user, int(items[3]))] * 2)
    assert list(both.statuses) == [ACCEPTED, DUPLICATE]
    assert state.history(user) == [int(items[0]), int(items[2]), int(items[3])]
    assert state.suppressed(user) == {int(items[2])}


@pytest.mark.parametrize("size", [0, 1001])
def test_an_empty_or_oversized_batch_is_invalid_argument(shop: Storefront, size: int) -> None:
    t = tag()
    with pytest.raises(grpc.RpcError) as err:
        shop.track([event(f"{t}-{i}", "u", 1) for i in range(size)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields, _, _ = status_of(err.value)
    assert fields == ["events"]


# -- answers that move -----------------------------------------------------------------


def category_share(items: Sequence[int], category: str, artifacts: Artifacts) -> float:
    catalog = artifacts.catalog
    rows = catalog.rows(list(items))
    return float(np.mean([catalog.category_of(r) == category for r in rows.tolist()]))


@dataclass
class Burst:
    user: str
    category: str
    items: list[int]
    before: float


def plan_burst(
    shop: Storefront, artifacts: Artifacts, user: str, history: set[int], n: int
) -> Burst:
    """A category this user's page does not favour, and its n most popular items."""
    catalog = artifacts.catalog
    page = shop.items(user)
    codes = catalog.category_codes
    in_stock = catalog.in_stock.astype(bool)
    candidates = []
    for code, name in enumerate(catalog.categories):
        rows = np.flatnonzero((codes == code) & in_stock)
        rows = np.array([r for r in rows if int(catalog.item_ids[r]) not in history])
        if len(rows) >= 3 * n:
            candidates.append((category_share(page, name, artifacts), -len(rows), name, rows))
    before, _, category, rows = min(candidates, key=lambda c: (c[0], c[1]))
    best = rows[np.argsort(-artifacts.popularity[rows], kind="stable")[:n]]
    return Burst(user, category, [int(catalog.item_ids[r]) for r in best], before)


def test_a_burst_of_clicks_moves_the_next_recommend(
    shop: Storefront, tiny_artifacts: Artifacts
) -> None:
    ids, histories = tiny_artifacts.users()
    shifts = []
    for i in (3, 101, 250, 377, 512):  # five shoppers with build-time history
        user, history = ids[i], set(histories[i].tolist())
        burst = plan_burst(shop, tiny_artifacts, user, history, n=15)
        t = tag()
        resp = shop.track([event(f"{t}-{k}", user, item) for k, item in enumerate(burst.items)])
        assert set(resp.statuses) == {ACCEPTED}
        acked = time.perf_counter()
        after_page = shop.items(user)  # the very next Recommend after the ack
        visible_ms = (time.perf_counter() - acked) * 1000
        after = category_share(after_page, burst.category, tiny_artifacts)
        print(
            f"\n{user}: {burst.category!r} share {burst.before:.0%} -> {after:.0%}; "
            f"ack -> first reflecting Recommend {visible_ms:.0f} ms"
        )
        assert not set(after_page) & set(burst.items), "recommended an item just clicked"
        shifts.append(after - burst.before)
    # The category was (nearly) absent from each page; 15 clicks typically bring 3 to 10 of
    # its items into the next page of 20. Every page must gain at least 2, and 3 on average.
    assert min(shifts) >= 0.1 and np.mean(shifts) >= 0.15, f"no clear shift: {shifts}"


def test_a_purchased_item_is_never_recommended_again(
    shop: Storefront, tiny_artifacts: Artifacts, state: RedisStateStore
) -> None:
    t = tag()
    shopper, control, buyer = (f"{who}-{t}" for who in ("shopper", "control", "buyer"))
    burst = plan_burst(shop, tiny_artifacts, shopper, set(), n=15)

    def clicks(who: str) -> list[storefront_pb2.Event]:
        return [event(f"{t}-{who}-{k}", who, burst.items[k % len(burst.items)]) for k in range(50)]

    # Right after the purchase: neither page 1 nor page 2 shows the item.
    assert set(shop.track(clicks(shopper)).statuses) == {ACCEPTED}
    x = shop.items(shopper)[0]  # the shopper's top recommendation
    assert shop.track([event(f"{t}-buy-x", shopper, x, PURCHASE)]).statuses == [ACCEPTED]
    acked = time.perf_counter()
    first, second = shop.two_pages(shopper)
    visible_ms = (time.perf_counter() - acked) * 1000
    print(f"\npurchase of {x}: ack -> first two pages without it {visible_ms:.0f} ms")
    assert x not in first and x not in second

    # Long after: the buyer buys the control's top item y, then makes the control's 50
    # clicks, which push the purchase out of the 50 recent events the gateway reads. Both
    # now have the same recent history; only the suppressed purchase keeps y out.
    assert set(shop.track(clicks(control)).statuses) == {ACCEPTED}
    y = shop.items(control)[0]
    assert shop.track([event(f"{t}-buy-y", buyer, y, PURCHASE)]).statuses == [ACCEPTED]
    assert set(shop.track(clicks(buyer)).statuses) == {ACCEPTED}
    assert state.history(buyer, 50) == state.history(control, 50)
    assert y in state.suppressed(buyer)
    assert y not in [item for page in shop.two_pages(buyer) for item in page]
    control_items = [item for page in shop.two_pages(control) for item in page]
    assert y in control_items, "y would not be shown anyway: a weak test"


def test_a_burst_of_purchases_makes_a_cold_item_popular(
    shop: Storefront, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    newcomer = f"newcomer-{tag()}"
    before = shop.items(newcomer)
    in_stock = np.flatnonzero(catalog.in_stock)
    coldest = in_stock[np.argsort(tiny_artifacts.popularity[in_stock], kind="stable")]
    cold = next(int(catalog.item_ids[r]) for r in coldest if int(catalog.item_ids[r]) not in before)
    t = tag()
    buys = [event(f"{t}-{k}", f"buyer-{t}-{k}", cold, PURCHASE) for k in range(30)]
    assert set(shop.track(buys).statuses) == {ACCEPTED}
    acked = time.monotonic()
    # Recall re-reads live popularity from Redis in the background once a second (by
    # design, so that no request waits on Redis): poll for the outcome with a deadline.
    deadline = acked + 15.0
    while cold not in (page := shop.items(newcomer)):
        assert time.monotonic() < deadline, f"cold item {cold} never reached {page}"
    print(f"\ncold item {cold}: in a newcomer's page {time.monotonic() - acked:.2f} s after ack")


# -- backpressure ----------------------------------------------------------------------


def test_ingestion_behind_answers_resource_exhausted_with_a_retry_delay(
    redis_cluster: Cluster, state: RedisStateStore, tiny_artifacts: Artifacts
) -> None:
    """Full batches from many callers exceed the 1000-event in-flight budget."""
    items = tiny_artifacts.catalog.item_ids
    t = tag()
    n_callers, batches_each = 12, 4
    overloaded: list[tuple[int | None, str]] = []
    lock = threading.Lock()
    gate = threading.Barrier(n_callers)

    def caller(c: int) -> int:
        client = Storefront(redis_cluster.gateway_address)
        accepted = 0
        try:
            gate.wait()
            for b in range(batches_each):
                batch = [
                    event(f"{t}-{c}-{b}-{k}", f"bp-{t}-{c}-{k % 50}", int(items[k % len(items)]))
                    for k in range(1000)
                ]
                while True:  # the retry loop of a well-behaved client
                    try:
                        resp = client.track(batch)
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                        _, delay, reason = status_of(err)
                        with lock:
                            overloaded.append((delay, reason))
                        time.sleep((delay or 0) / 1000)  # honour the server's RetryInfo
                        continue
                    assert set(resp.statuses) == {ACCEPTED}
                    accepted += len(resp.statuses)
                    break
        finally:
            client.close()
        return accepted

    with ThreadPoolExecutor(n_callers) as pool:
        accepted = sum(pool.map(caller, range(n_callers)))
    assert accepted == n_callers * batches_each * 1000, "a retried batch was not accepted"
    print(
        f"\n{len(overloaded)} RESOURCE_EXHAUSTED answers, retry delays (ms): "
        f"{sorted({d for d, _ in overloaded if d is not None})}"
    )
    assert overloaded, "ingestion never fell behind"
    assert all(reason == "OVERLOADED" for _, reason in overloaded)
    assert all(d is not None and 5 <= d <= 1000 for d, _ in overloaded)
    # Every event of a rejected batch was applied once, after its retry.
    for c in (0, n_callers - 1):
        assert len(state.history(f"bp-{t}-{c}-0")) == batches_each * 20


# -- durability across kill -9 ---------------------------------------------------------


@dataclass
class Load:
    """Clients sending batches of 100 until stopped; a batch whose call failed is re-sent
    (same event ids) until it gets an answer, as a client of Track must."""

    address: str
    items: np.ndarray
    name: str = field(default_factory=tag)
    clients: int = 3
    users_per_client: int = 20
    acked: list[list[storefront_pb2.Event]] = field(default_factory=list)
    sent: dict[str, list[int]] = field(default_factory=dict)
    in_doubt: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def acked_events(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.acked)

    def _run(self, c: int) -> None:
        client = Storefront(self.address)
        rng = np.random.default_rng(c)
        n = 0
        try:
            while not self.stop.is_set():
                batch = []
                for _ in range(100):
                    user = f"load-{self.name}-{c}-{n % self.users_per_client}"
                    item = int(self.items[rng.integers(len(self.items))])
                    batch.append(event(f"{self.name}-{c}-{n}", user, item))
                    with self.lock:
                        self.sent.setdefault(user, []).append(item)
                    n += 1
                while True:
                    try:
                        resp = client.track(batch, timeout=5)
                        break
                    except grpc.RpcError as err:  # the gateway is down or warming up
                        retry = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                        if err.code() not in retry:
                            raise
                        with self.lock:
                            self.in_doubt += 1
                        time.sleep(0.05)  # back off before retrying the same batch
                statuses = set(resp.statuses)
                assert statuses <= {ACCEPTED, DUPLICATE}, resp
                with self.lock:
                    self.acked.append(
                        [e for e, s in zip(batch, resp.statuses, strict=True) if s == ACCEPTED]
                    )
        finally:
            client.close()

    def wait_for(self, events: int, timeout_s: float = 60.0) -> None:
        # Waits for the load to make observable progress (acked events), with a deadline.
        deadline = time.monotonic() + timeout_s
        while self.acked_events() < events:
            assert time.monotonic() < deadline, f"load stalled at {self.acked_events()} events"
            assert all(t.is_alive() for t in self.threads), "a load client failed"
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads)


def similar_probe(shop: Storefront, anchor: int) -> tuple[str, list[int]]:
    """A new shopper who clicked the 10 items most similar to ``anchor``."""
    similar = shop.items("", 10, context_item_id=anchor)
    user, t = f"probe-{tag()}", tag()
    clicks = [event(f"{t}-{k}", user, item) for k, item in enumerate(similar)]
    assert set(shop.track(clicks).statuses) == {ACCEPTED}
    assert not set(shop.items(user, 20, context_item_id=anchor)) & set(similar)
    return user, similar


def check_survives_kill(
    cluster: Cluster, artifacts: Artifacts, state: RedisStateStore | None
) -> None:
    shop = Storefront(cluster.gateway_address)
    try:
        anchor = int(artifacts.catalog.item_ids[np.flatnonzero(artifacts.catalog.in_stock)[5]])
        probe, similar = similar_probe(shop, anchor)
        load = Load(cluster.gateway_address, artifacts.catalog.item_ids).start()
        try:
            load.wait_for(1500)
            acked_before_kill = load.acked_events()
            cluster.restart("gateway", kill=True)  # SIGKILL mid-load; back when healthy
            load.wait_for(acked_before_kill + 600)  # the clients got through again
        finally:
            load.finish()
        acked = [e for batch in load.acked for e in batch]
        print(
            f"\n{cluster.state}: {len(acked)} events acknowledged, {acked_before_kill} before "
            f"the kill; {load.in_doubt} calls failed during the restart and were re-sent"
        )
        # Every acknowledged event is still known: sent again, each one is a DUPLICATE.
        for i in range(0, len(acked), 1000):
            resp = shop.track(acked[i : i + 1000])
            assert set(resp.statuses) == {DUPLICATE}, "an acknowledged event was lost"
        # And its effect is there: the probe's clicks still shape its answers.
        assert not set(shop.items(probe, 20, context_item_id=anchor)) & set(similar)
        assert set(similar) <= set(shop.items("", 20, context_item_id=anchor))
        if state is not None:  # exact: every event sent applied once, in order
            for user, items in load.sent.items():
                assert state.history(user) == items, f"history of {user} differs"
    finally:
        shop.close()


def test_acknowledged_events_survive_kill_9_with_redis(
    redis_cluster: Cluster, tiny_artifacts: Artifacts, state: RedisStateStore
) -> None:
    check_survives_kill(redis_cluster, tiny_artifacts, state)


def test_acknowledged_events_survive_kill_9_with_the_embedded_store(
    embedded_cluster: Cluster, tiny_artifacts: Artifacts
) -> None:
    check_survives_kill(embedded_cluster, tiny_artifacts, None)
