"""The same behaviour tests against the in-memory store, a real Redis and a real Redis Cluster
(three masters, ``tests/redis_fixture.py``)."""

from __future__ import annotations

import gc
import itertools
import random
import socket
import threading
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from tests.redis_fixture import RedisClusterServer

from sluice.core.errors import Unavailable
from sluice.events.model import Event, EventType
from sluice.state.store import (
    InMemoryStateStore,
    OnlineStateStore,
    RedisStateStore,
    StateConfig,
    UserState,
    Window,
    connect,
)

T0 = 1_700_000_000_000
HOUR = 3_600_000
ATTRS: dict[int, tuple[str, str]] = {
    1: ("shoes", "acme"),
    2: ("shoes", "zed"),
    3: ("hats", "acme"),
    4: ("hats", ""),
    5: ("", ""),
    6: ("socks", "zed"),
}

MakeStore = Callable[..., OnlineStateStore]
_prefixes = itertools.count()


def ev(eid: str, user: str, item: int, kind: EventType = EventType.VIEW, ts: int = T0) -> Event:
    return Event(eid, user, item, kind, ts)


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_any(request: pytest.FixtureRequest) -> redis.Redis | RedisCluster:
    """A flushed client of one Redis server, then of a Redis Cluster."""
    name = "redis_client" if request.param == "redis" else "redis_cluster_client"
    client: redis.Redis | RedisCluster = request.getfixturevalue(name)
    return client


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_store(request: pytest.FixtureRequest) -> MakeStore:
    client: redis.Redis | RedisCluster | None = None
    if request.param == "redis":
        client = request.getfixturevalue("redis_client")
    elif request.param == "redis-cluster":
        client = request.getfixturevalue("redis_cluster_client")

    def make(
        config: StateConfig | None = None, attributes: dict[int, tuple[str, str]] | None = None
    ) -> OnlineStateStore:
        attrs = ATTRS if attributes is None else attributes
        if client is None:
            return InMemoryStateStore(attrs, config=config)
        return RedisStateStore(client, attrs, config=config, prefix=f"t{next(_prefixes)}:")

    return make


def test_apply_is_idempotent_by_event_id(make_store: MakeStore) -> None:
    s = make_store()
    assert s.apply([ev("a", "u", 1), ev("b", "u", 2), ev("a", "u", 3)]) == [True, True, False]
    assert s.apply([ev("a", "u", 1), ev("c", "u", 3)]) == [False, True]
    assert s.apply([]) == []
    assert s.seen("a")
    assert not s.seen("zz")
    assert s.seen_many(["a", "zz", "c"]) == [True, False, True]
    assert s.seen_many([]) == []
    assert s.history("u") == [1, 2, 3]
    # the payload each id was applied with, for telling a retry from a reused id
    digests = s.digests(["a", "zz", "c"])
    assert digests == [ev("a", "u", 1).digest, None, ev("c", "u", 3).digest]
    assert digests[0] != ev("a", "u", 3).digest
    assert s.digests([]) == []


def test_in_memory_seen_ids_expire_after_the_ttl() -> None:
    s = InMemoryStateStore(ATTRS, config=StateConfig(dedupe_ttl_s=0))  # expired at once
    assert s.apply([ev("a", "u", 1), ev("b", "u", 2)]) == [True, True]
    assert s.seen_many(["a", "b"]) == [False, False] and s.digests(["a"]) == [None]
    assert s.apply([ev("a", "u", 1)]) == [True]  # forgotten: applied again
    assert s.history("u") == [1, 2, 1]


def _tracked_container_sizes(root: object) -> list[int]:
    """Sizes of the containers the cyclic collector tracks, reachable from ``root`` through
    containers and the store module's own objects (not functions, modules or classes)."""
    sizes, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (dict, list, set, tuple)):
            sizes.append(len(obj))
        elif obj is not root and type(obj).__module__ != InMemoryStateStore.__module__:
            continue
        todo.extend(r for r in gc.get_referents(obj) if gc.is_tracked(r))
    return sizes


def test_the_in_memory_store_grows_nothing_the_cyclic_collector_walks() -> None:
    """Every collector pass walks the tracked containers in full: the ids kept for a day
    (young passes walked them at each insert) and the users' histories (every full pass walked
    each id of each user) must live in containers the collector never tracks."""
    s = InMemoryStateStore(ATTRS)
    n = 3000  # 7 users: each history is full (200)
    assert all(s.apply([ev(f"e{i}", f"u{i % 7}", i % 6 + 1) for i in range(n)]))
    sizes = _tracked_container_sizes(s)
    assert sizes and max(sizes) < 100
    assert s.seen_many(["e0", f"e{n - 1}", "zz"]) == [True, True, False]
    assert len(s.history("u0")) == 200 and s.history("u0", 3) == s.history("u0")[-3:]


def test_history_is_most_recent_last_and_capped(make_store: MakeStore) -> None:
    s = make_store(StateConfig(history_cap=3))
    s.apply([ev(f"a{i}", "u", i) for i in range(1, 6)])  # capped within one batch
    assert s.history("u") == [3, 4, 5]
    s.apply([ev("b1", "u", 6)])
    s.apply([ev("b2", "u", 1)])
    assert s.history("u") == [5, 6, 1]
    assert s.history("u", limit=2) == [6, 1]
    assert s.history("nobody") == []


def test_only_purchases_are_suppressed(make_store: MakeStore) -> None:
    s = make_store()
    s.apply(
        [
            ev("a", "u", 1, EventType.VIEW),
            ev("b", "u", 2, EventType.PURCHASE),
            ev("c", "u", 3, EventType.ADD_TO_CART),
            ev("d", "u", 4, EventType.CLICK),
            ev("e", "v", 5, EventType.PURCHASE),
        ]
    )
    assert s.suppressed("u") == frozenset({2})
    assert s.suppressed("v") == frozenset({5})
    assert s.suppressed("nobody") == frozenset()


def test_affinities_weight_events_by_type(make_store: MakeStore) -> None:
    s = make_store()
    s.apply(
        [
            ev("a", "u", 1, EventType.VIEW),  # shoes/acme +1
            ev("b", "u", 2, EventType.CLICK),  # shoes/zed +2
            ev("c", "u", 3, EventType.ADD_TO_CART),  # hats/acme +4
            ev("d", "u", 4, EventType.PURCHASE),  # hats/- +8
            ev("e", "u", 5, EventType.PURCHASE),  # no attributes
            ev("f", "u", 99, EventType.PURCHASE),  # unknown item
        ]
    )
    assert s.category_affinities("u") == [("hats", pytest.approx(12.0)), ("shoes", 3.0)]
    assert s.brand_affinities("u") == [("acme", pytest.approx(5.0)), ("zed", 2.0)]
    assert s.category_affinities("u", k=1) == [("hats", pytest.approx(12.0))]
    assert s.category_affinities("nobody") == []
    assert s.history("u") == [1, 2, 3, 4, 5, 99]


def test_affinities_decay_by_half_life(make_store: MakeStore) -> None:
    s = make_store(StateConfig(affinity_half_life_ms=HOUR))
    s.apply([ev("a", "u", 3, EventType.PURCHASE, T0)])  # hats 8
    s.apply([ev("b", "u", 1, EventType.VIEW, T0 + 2 * HOUR)])  # shoes 1, hats now 8/4
    assert s.category_affinities("u") == [
        ("hats", pytest.approx(2.0, rel=1e-12)),
        ("shoes", pytest.approx(1.0, rel=1e-12)),
    ]
    # an older event arriving late counts with its decayed weight
    s.apply([ev("c", "u", 6, EventType.VIEW, T0 + HOUR)])
    assert dict(s.category_affinities("u"))["socks"] == pytest.approx(0.5, rel=1e-12)


def test_scores_survive_rescaling_and_tiny_ones_are_pruned(make_store: MakeStore) -> None:
    second = 1000
    config = StateConfig(
        affinity_half_life_ms=second,
        popularity_short_half_life_ms=second,
        popularity_long_half_life_ms=2 * second,
    )
    s = make_store(config)
    s.apply([ev("a", "u", 6, EventType.PURCHASE, T0)])  # socks 8
    s.apply([ev("b", "u", 1, EventType.VIEW, T0 + 33 * second)])  # > 32 half-lives: rescale
    s.apply([ev("c", "u", 3, EventType.VIEW, T0 + 34 * second)])
    assert s.category_affinities("u") == [
        ("hats", pytest.approx(1.0, rel=1e-12)),
        ("shoes", pytest.approx(0.5, rel=1e-12)),
    ]  # socks (8 * 2**-34) was pruned
    assert s.top_popular(10, window="short") == [
        (3, pytest.approx(1.0, rel=1e-12)),
        (1, pytest.approx(0.5, rel=1e-12)),
    ]
    assert s.top_popular(10) == [  # 17 long half-lives: not rescaled, nothing pruned
        (3, pytest.approx(1.0, rel=1e-12)),
        (1, pytest.approx(2**-0.5, rel=1e-12)),
        (6, pytest.approx(8 * 2**-17, rel=1e-12)),
    ]


def test_user_state_reads_everything_at_once(make_store: MakeStore) -> None:
    s = make_store()
    s.apply(
        [
            ev("a", "u", 1, EventType.VIEW, T0),
            ev("b", "u", 3, EventType.PURCHASE, T0 + 10),
            ev("c", "u", 2, EventType.CLICK, T0 + 5),
        ]
    )
    state = s.user_state("u", history_limit=2, top_k=1)
    assert state.user_id == "u"
    assert state.history == [3, 2]
    assert state.categories == [("hats", pytest.approx(8.0, rel=1e-6))]
    assert state.brands == [("acme", pytest.approx(9.0, rel=1e-6))]
    assert state.suppressed == frozenset({3})
    assert state.last_event_ms == T0 + 10
    assert s.user_state("u").history == [1, 3, 2]
    assert s.user_state("nobody") == UserState("nobody")


def test_popularity_is_weighted_and_windowed(make_store: MakeStore) -> None:
    s = make_store(
        StateConfig(popularity_short_half_life_ms=HOUR, popularity_long_half_life_ms=24 * HOUR)
    )
    s.apply([ev("a", "u", 1, EventType.PURCHASE, T0)])
    s.apply([ev(f"v{i}", f"u{i}", 2, EventType.VIEW, T0 + 2 * HOUR) for i in range(3)])
    assert s.top_popular(5, window="short") == [
        (2, pytest.approx(3.0, rel=1e-12)),
        (1, pytest.approx(2.0, rel=1e-12)),  # 8 after two short half-lives
    ]
    assert s.top_popular(5) == [
        (1, pytest.approx(8 * 2 ** (-2 / 24), rel=1e-12)),
        (2, pytest.approx(3.0, rel=1e-12)),
    ]
    assert s.top_popular(1) == [(1, pytest.approx(8 * 2 ** (-2 / 24), rel=1e-12))]
    assert s.top_popular(0) == []


def test_popularity_ties_break_like_redis(make_store: MakeStore) -> None:
    s = make_store()
    s.apply([ev("a", "u", 10), ev("b", "u", 9), ev("c", "u", 100)])
    assert [item for item, _ in s.top_popular(3)] == [9, 100, 10]  # member string, descending


def test_trending_prefers_a_recent_burst(make_store: MakeStore) -> None:
    s = make_store()
    # item 1: one view an hour for a day; item 2: a burst in the last hour; item 3: old news
    s.apply([ev(f"s{h}", "u", 1, EventType.VIEW, T0 + h * HOUR) for h in range(24)])
    s.apply([ev("old", "u", 3, EventType.PURCHASE, T0)])
    s.apply([ev(f"b{i}", f"u{i}", 2, EventType.VIEW, T0 + 23 * HOUR + i) for i in range(6)])
    top = s.trending(3)
    assert [item for item, _ in top] == [2, 1, 3]
    assert top[0][1] > 1.0 > top[2][1]
    assert s.trending(0) == []
    assert make_store().trending(5) == []
    assert make_store().top_popular(5) == []


def test_non_ascii_ids_and_attributes(make_store: MakeStore) -> None:
    s = make_store(attributes={7: ("Schuhe/ß", "ブランド")})
    assert s.apply([ev("évé-😀", "用户-ü", 7, EventType.CLICK)]) == [True]
    assert s.seen("évé-😀")
    assert s.history("用户-ü") == [7]
    assert s.category_affinities("用户-ü") == [("Schuhe/ß", pytest.approx(2.0))]
    assert s.brand_affinities("用户-ü") == [("ブランド", pytest.approx(2.0))]


def test_concurrent_apply(make_store: MakeStore) -> None:
    s = make_store(StateConfig(history_cap=10_000))
    n_threads, per_thread = 4, 250

    def work(t: int) -> None:
        for b in range(0, per_thread, 25):
            s.apply([ev(f"{t}-{i}", "u", 1 + i % 6) for i in range(b, b + 25)])
            s.apply([ev(f"{t}-{b}", "u", 1)])  # duplicate of one just applied

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(s.history("u")) == n_threads * per_thread
    assert sum(score for _, score in s.top_popular(10)) == pytest.approx(n_threads * per_thread)


def test_redis_seen_ids_expire(redis_any: redis.Redis | RedisCluster) -> None:
    s = RedisStateStore(redis_any, ATTRS, config=StateConfig(dedupe_ttl_s=123), prefix="x:")
    s.apply([ev("a", "u", 1)])
    assert 0 < redis_any.ttl(s.event_key("a")) <= 123  # the commit marker
    assert 0 < redis_any.ttl(s.user_key("u", "ev:a")) <= 123  # the user half's marker


def test_both_stores_agree_on_a_random_stream(redis_any: redis.Redis | RedisCluster) -> None:
    config = StateConfig(
        history_cap=20,
        affinity_half_life_ms=20_000,
        popularity_short_half_life_ms=5_000,
        popularity_long_half_life_ms=60_000,
        trending_candidates=1000,
    )
    rng = random.Random(11)
    attrs = {i: (f"c{i % 7}", f"b{i % 5}" if i % 3 else "") for i in range(1, 60)}
    memory = InMemoryStateStore(attrs, config=config)
    red = RedisStateStore(redis_any, attrs, config=config, prefix="eq:")
    events = []
    ts = T0
    for n in range(3000):
        ts += rng.choice([0, 1, 7, 150, 900])
        if n in (1000, 2000):
            ts += 40 * 60_000  # long gaps force rescales
        jitter = -rng.randint(0, 30_000) if rng.random() < 0.1 else 0  # late events
        eid = f"e{rng.randint(0, 3500)}"  # some duplicates
        events.append(
            Event(
                eid,
                f"u{rng.randint(0, 30)}",
                rng.randint(1, 70),
                rng.choice(list(EventType)),
                ts + jitter,
            )
        )
    i = 0
    while i < len(events):
        size = rng.randint(1, 120)
        assert memory.apply(events[i : i + size]) == red.apply(events[i : i + size])
        i += size

    for u in range(31):
        a, b = memory.user_state(f"u{u}", top_k=100), red.user_state(f"u{u}", top_k=100)
        assert a.history == b.history
        assert a.suppressed == b.suppressed
        assert a.last_event_ms == b.last_event_ms
        assert dict(a.categories) == pytest.approx(dict(b.categories), rel=1e-9, abs=1e-12)
        assert dict(a.brands) == pytest.approx(dict(b.brands), rel=1e-9, abs=1e-12)
    windows: tuple[Window, ...] = ("short", "long")
    for window in windows:
        pop_a, pop_b = memory.top_popular(100, window=window), red.top_popular(100, window=window)
        assert dict(pop_a) == pytest.approx(dict(pop_b), rel=1e-9, abs=1e-12)
    trend_a, trend_b = memory.trending(100), red.trending(100)
    assert dict(trend_a) == pytest.approx(dict(trend_b), rel=1e-9)
    assert [s for _, s in trend_a] == sorted((s for _, s in trend_a), reverse=True)


def test_unreachable_redis_is_unavailable() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
    store = RedisStateStore(client, ATTRS)
    with pytest.raises(Unavailable):
        store.apply([ev("a", "u", 1)])
    with pytest.raises(Unavailable):
        store.user_state("u")


def test_forget_user_erases_their_state_and_remembers_it(make_store: MakeStore) -> None:
    s = make_store()
    s.apply([ev("a", "u", 1), ev("b", "u", 2, EventType.PURCHASE), ev("c", "v", 3)])
    assert s.history("u") == [1, 2] and not s.erased("u")
    s.forget_user("u")
    s.forget_user("u")  # idempotent
    assert s.history("u") == [] and s.suppressed("u") == frozenset()
    assert s.erased("u") and not s.erased("v")
    assert s.history("v") == [3]


def test_search_sessions_belong_to_their_user_and_go_with_them(make_store: MakeStore) -> None:
    s = make_store()
    assert s.session("u", "s1") is None
    s.save_session("u", "s1", '{"turn": 1}')
    s.save_session("u", "s1", '{"turn": 2}')  # the next turn replaces it
    s.save_session("u", "s2", "other")
    s.save_session("v", "s1", "v's own")
    s.save_session("", "s1", "anonymous")  # without a user: the session id alone
    assert s.session("u", "s1") == '{"turn": 2}' and s.session("u", "s2") == "other"
    assert s.session("v", "s1") == "v's own" and s.session("", "s1") == "anonymous"
    assert s.session("", "s2") is None  # another shopper's session id is not theirs
    s.forget_user("u")
    assert s.session("u", "s1") is None and s.session("u", "s2") is None
    assert s.session("v", "s1") == "v's own"


def test_a_redis_session_expires_after_its_ttl(redis_any: redis.Redis | RedisCluster) -> None:
    s = RedisStateStore(redis_any, ATTRS, prefix="sess:", config=StateConfig(session_ttl_s=90))
    s.save_session("u", "s1", "state")
    ttl = redis_any.ttl(s.user_key("u", "sess"))
    assert 0 < ttl <= 90


# -- the split apply on one server and on a cluster -------------------------------------------


def test_one_users_keys_share_a_slot_and_popularity_has_its_own(
    redis_cluster_client: RedisCluster,
) -> None:
    s = RedisStateStore(redis_cluster_client, ATTRS, prefix="slots:")
    for user in ("u", "用户-ü", "{brace}", "}x{", "50%"):
        keys = [s.user_key(user, part) for part in ("seq", "sup", "meta", "cat", "brand", "sess")]
        keys += [s.user_key(user, "erased"), s.user_key(user, "ev:some-event")]
        assert len({redis_cluster_client.keyslot(k) for k in keys}) == 1, user
    pop = [s.popularity_key(p) for p in ("short", "long", "meta")] + [s.event_key("e1")]
    assert len({redis_cluster_client.keyslot(k) for k in pop}) == 1
    users = {redis_cluster_client.keyslot(s.user_key(f"user{i}", "seq")) for i in range(50)}
    assert len(users) > 40  # users spread over slots (and so over the masters)
    s.apply([ev("a", "}x{", 1, EventType.PURCHASE), ev("b", "50%", 2)])
    assert s.history("}x{") == [1] and s.suppressed("}x{") == frozenset({1})
    s.forget_user("}x{")
    assert s.erased("}x{") and s.history("}x{") == [] and s.history("50%") == [2]


def test_a_crash_between_the_two_halves_is_completed_once_by_the_retry(
    redis_any: redis.Redis | RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user half lands, then Redis goes away before the popularity half: the event must
    read as not applied (so Track does not call its retry a duplicate), and the retry must
    finish it without counting the user half twice."""
    from sluice.state import store as store_module

    s = RedisStateStore(redis_any, ATTRS, prefix="crash:")
    real = store_module.run_scripts
    calls = 0

    def dies_before_popularity(client: object, batch: list[object]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the popularity half
            raise redis.ConnectionError("connection lost")
        return real(client, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module, "run_scripts", dies_before_popularity)
    batch = [ev("a", "u", 1, EventType.PURCHASE), ev("b", "v", 2, EventType.CLICK)]
    with pytest.raises(Unavailable):
        s.apply(batch)
    assert s.history("u") == [1] and s.history("v") == [2]  # the user half is there
    assert s.seen_many(["a", "b"]) == [False, False]  # not committed: a retry applies it
    assert s.digests(["a", "b"]) == [None, None]
    assert s.top_popular(5) == []
    monkeypatch.setattr(store_module, "run_scripts", real)
    assert s.apply(batch) == [True, True]  # the retry completes it
    assert s.apply(batch) == [False, False]  # and a third time nothing
    assert s.history("u") == [1] and s.history("v") == [2]  # once
    assert s.category_affinities("u") == [("shoes", pytest.approx(8.0))]  # not 16
    assert dict(s.top_popular(5)) == {1: pytest.approx(8.0), 2: pytest.approx(2.0)}


def test_concurrent_retries_of_one_batch_apply_it_once(
    redis_any: redis.Redis | RedisCluster,
) -> None:
    """Several gateways apply the same batch at once (a client retried on each): every event
    is applied by exactly one of them, history and popularity count it once."""
    s = RedisStateStore(redis_any, ATTRS, config=StateConfig(history_cap=1000), prefix="race:")
    batch = [ev(f"e{i}", f"u{i % 7}", 1 + i % 6, EventType.CLICK) for i in range(60)]
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results: list[list[bool]] = [[] for _ in range(n_threads)]

    def work(t: int) -> None:
        barrier.wait()
        results[t] = s.apply(batch)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_event = [sum(r[i] for r in results) for i in range(len(batch))]
    assert per_event == [1] * len(batch)
    for u in range(7):
        assert s.history(f"u{u}") == [e.item_id for e in batch if e.user_id == f"u{u}"]
    assert sum(score for _, score in s.top_popular(10)) == pytest.approx(2.0 * len(batch))


def test_an_id_reused_by_another_user_is_not_applied_again(make_store: MakeStore) -> None:
    s = make_store()
    assert s.apply([ev("a", "u", 1)]) == [True]
    assert s.apply([ev("a", "v", 2), ev("b", "w", 3), ev("b", "x", 4)]) == [False, True, False]
    assert s.history("v") == [] and s.history("x") == [] and s.history("w") == [3]
    assert s.digests(["a", "b"]) == [ev("a", "u", 1).digest, ev("b", "w", 3).digest]


def test_an_erasure_recorded_before_the_cluster_layout_still_holds(
    redis_any: redis.Redis | RedisCluster,
) -> None:
    redis_any.sadd("old:erased", "gone")  # how erasures were kept before
    s = RedisStateStore(redis_any, ATTRS, prefix="old:")
    assert s.erased("gone") and not s.erased("here")


def test_redis_cluster_url(redis_cluster_server: RedisClusterServer) -> None:
    url = redis_cluster_server.url
    assert url.startswith("redis+cluster://")
    store = RedisStateStore.from_url(url, ATTRS, prefix="url:")
    try:
        assert store.clustered
        assert store.apply([ev("a", "u", 1)]) == [True]
        assert store.history("u") == [1]
    finally:
        store.close()
    with pytest.raises(ValueError, match="host:port"):
        connect("redis+cluster://nohostport/")
    plain = connect("redis://127.0.0.1:1/0")
    assert isinstance(plain, redis.Redis)
    plain.close()
