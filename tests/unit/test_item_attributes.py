"""The state stores' item -> (category, brand) lookup, one per applied batch: the batch lookup
gives exactly what the per-event lookup gave (known, unknown, out-of-range, live-added,
live-changed and deleted items), the stores call it once per ``apply`` and never per event,
and a store's state after a stream of batches equals the per-event path's, in memory and in
Redis. Live catalog changes between batches are seen by the next batch."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from sluice.data.catalog import Catalog
from sluice.data.updates import ItemChange, LiveCatalog
from sluice.events.ingest import Ingestor
from sluice.events.log import EventLog
from sluice.events.model import Event, EventStatus, EventType, now_ms
from sluice.gateway.users import CatalogAttributes, attributes_of, item_attributes
from sluice.state.store import (
    InMemoryStateStore,
    OnlineStateStore,
    RedisStateStore,
    StateConfig,
    Window,
    attributes_many,
)

T0 = 1_700_000_000_000


def per_event(catalog: Catalog, item_id: int) -> tuple[str, str] | None:
    """The lookup the stores made for every event before (one ``Catalog.row`` each)."""
    row = catalog.row(item_id)
    return None if row < 0 else (catalog.category_of(row), catalog.brand_of(row))


def shop(room: int = 8) -> Catalog:
    ids = [10, 11, 12, 13, 20, 21, 500]
    return Catalog.from_columns(
        ids,
        [f"item {i}" for i in ids],
        categories=["shoes", "shoes", "hats", "", "socks", "hats", "bags"],
        brands=["acme", "zed", "acme", "zed", "", "acme", "zed"],
    ).with_room(room)


PROBES = [10, 11, 12, 13, 20, 21, 500, 0, -1, 1, 14, 499, 501, 10**9, (1 << 63) - 1, 10, 12]


def test_the_batch_lookup_gives_the_per_event_answers_for_known_and_unknown_ids() -> None:
    catalog = shop()
    expected = [per_event(catalog, i) for i in PROBES]
    assert attributes_of(catalog, PROBES) == expected
    assert expected[:7] == [
        ("shoes", "acme"),
        ("shoes", "zed"),
        ("hats", "acme"),
        ("unknown", "zed"),
        ("socks", "unknown"),
        ("hats", "acme"),
        ("bags", "zed"),
    ]
    assert expected[7:15] == [None] * 8  # not in the catalog (and no empty room row either)
    lookup = item_attributes(catalog)
    assert lookup.many(PROBES) == expected
    assert [lookup(i) for i in PROBES] == expected
    assert attributes_of(catalog, []) == []
    assert attributes_of(catalog, [0, 7, -5]) == [None, None, None]


def test_ids_outside_int64_are_no_items() -> None:
    catalog = shop()
    assert attributes_of(catalog, [1 << 63, 10, -(1 << 63) - 1, 12]) == [
        None,
        ("shoes", "acme"),
        None,
        ("hats", "acme"),
    ]


def test_an_empty_catalog_knows_nothing() -> None:
    empty = Catalog.from_columns([], [])
    assert attributes_of(empty, [1, 2]) == [None, None]
    assert attributes_of(empty.with_room(4), [1, 0, -1]) == [None, None, None]


def test_live_added_changed_and_deleted_items_match_the_per_event_lookup() -> None:
    live = LiveCatalog(shop(), None)
    lookup = CatalogAttributes(lambda: live.catalog)  # made before the changes
    probes = [*PROBES, 600, 601, 602]
    assert lookup.many(probes) == [per_event(live.catalog, i) for i in probes]
    assert lookup.many([600, 601]) == [None, None]
    live.apply(
        [
            ItemChange(600, {"title": "new boot", "category": "boots", "brand": "neo"}),
            ItemChange(601, {"title": "plain"}),  # no category or brand: "unknown"
            ItemChange(11, {"category": "sandals"}),  # a new category for a build item
            ItemChange(12, {"brand": "zed"}),
            ItemChange(20, delete=True),  # hidden, still a row: its attributes stay
        ]
    )
    expected = [per_event(live.catalog, i) for i in probes]
    assert lookup.many(probes) == expected
    assert [lookup(i) for i in probes] == expected
    assert lookup.many([600, 601, 11, 12, 20, 602]) == [
        ("boots", "neo"),
        ("unknown", "unknown"),
        ("sandals", "zed"),
        ("hats", "zed"),
        ("socks", "unknown"),
        None,
    ]


def test_the_lookup_follows_the_catalog_it_is_given_at_each_call() -> None:
    first, second = shop(), Catalog.from_columns([10, 700], ["a", "b"], ["x", "y"], ["p", "q"])
    current = [first]
    lookup = CatalogAttributes(lambda: current[0])
    assert lookup.many([10, 700]) == [("shoes", "acme"), None]
    current[0] = second  # a new build became current
    assert lookup.many([10, 700]) == [("x", "p"), ("y", "q")]


class Counting:
    """Item attributes with a batch lookup that count how they are called."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.batches: list[list[int]] = []
        self.singles = 0

    def __call__(self, item_id: int) -> tuple[str, str] | None:
        self.singles += 1
        return per_event(self.catalog, item_id)

    def many(self, item_ids: Sequence[int]) -> list[tuple[str, str] | None]:
        self.batches.append(list(item_ids))
        return attributes_of(self.catalog, item_ids)


def test_the_in_memory_store_looks_up_once_per_apply() -> None:
    attrs = Counting(shop())
    store = InMemoryStateStore(attrs)
    events = [Event(f"e{i}", "u", item, EventType.VIEW, T0 + i) for i, item in enumerate(PROBES)]
    store.apply(events[:5])
    store.apply(events)  # five of them are duplicates now
    store.apply([])
    assert attrs.singles == 0
    assert attrs.batches == [PROBES[:5], PROBES]


def test_the_redis_store_looks_up_once_per_apply(redis_client: redis.Redis) -> None:
    attrs = Counting(shop())
    store = RedisStateStore(redis_client, attrs, prefix="once:")
    events = [Event(f"e{i}", "u", item, EventType.VIEW, T0 + i) for i, item in enumerate(PROBES)]
    store.apply(events[:5])
    store.apply(events)  # only what is not applied yet is looked up
    store.apply(events)
    assert attrs.singles == 0
    assert attrs.batches == [PROBES[:5], PROBES[5:]]


def test_a_mapping_a_callable_and_nothing_still_serve_as_attributes() -> None:
    mapping = {1: ("a", "b")}
    assert list(attributes_many(mapping)([1, 2])) == [("a", "b"), None]
    assert list(attributes_many(lambda i: ("c", "d") if i == 2 else None)([1, 2])) == [
        None,
        ("c", "d"),
    ]
    assert list(attributes_many(None)([1, 2])) == [None, None]
    catalog = shop()
    assert attributes_many(item_attributes(catalog))([10, 1]) == [("shoes", "acme"), None]


def random_stream(seed: int, items: Sequence[int], n: int = 2500) -> list[Event]:
    rng = random.Random(seed)
    events = []
    ts = T0
    for k in range(n):
        ts += rng.choice([0, 1, 7, 150, 900])
        if k in (800, 1600):
            ts += 40 * 60_000  # rescales
        jitter = -rng.randint(0, 30_000) if rng.random() < 0.1 else 0
        events.append(
            Event(
                f"e{rng.randint(0, 3000)}",  # some duplicates
                f"u{rng.randint(0, 25)}",
                rng.choice(items),
                rng.choice(list(EventType)[:3]),
                ts + jitter,
            )
        )
    return events


CONFIG = StateConfig(
    history_cap=20,
    affinity_half_life_ms=20_000,
    popularity_short_half_life_ms=5_000,
    popularity_long_half_life_ms=60_000,
    trending_candidates=1000,
)


def apply_in_batches(
    stores: Sequence[OnlineStateStore],
    events: Sequence[Event],
    seed: int,
    between: Callable[[int], None] = lambda _batch: None,
) -> None:
    rng = random.Random(seed)
    i = batch = 0
    while i < len(events):
        size = rng.randint(1, 150)
        results = [s.apply(events[i : i + size]) for s in stores]
        assert all(r == results[0] for r in results)
        i += size
        batch += 1
        between(batch)


def assert_same_state(a: OnlineStateStore, b: OnlineStateStore, users: int, exact: bool) -> None:
    for u in range(users):
        sa, sb = a.user_state(f"u{u}", top_k=100), b.user_state(f"u{u}", top_k=100)
        assert sa.history == sb.history
        assert sa.suppressed == sb.suppressed
        assert sa.last_event_ms == sb.last_event_ms
        if exact:
            assert sa == sb
        else:
            assert dict(sa.categories) == pytest.approx(dict(sb.categories), rel=1e-9, abs=1e-12)
            assert dict(sa.brands) == pytest.approx(dict(sb.brands), rel=1e-9, abs=1e-12)
    windows: tuple[Window, ...] = ("short", "long")
    for window in windows:
        pa, pb = a.top_popular(100, window=window), b.top_popular(100, window=window)
        if exact:
            assert pa == pb
        else:
            assert dict(pa) == pytest.approx(dict(pb), rel=1e-9, abs=1e-12)
    ta, tb = a.trending(100), b.trending(100)
    if exact:
        assert ta == tb
    else:
        assert dict(ta) == pytest.approx(dict(tb), rel=1e-9)


def live_changes(live: LiveCatalog) -> Callable[[int], None]:
    """Between batches: add items, change categories and brands, delete one."""
    script = {
        3: [ItemChange(600, {"title": "new boot", "category": "boots", "brand": "neo"})],
        6: [ItemChange(11, {"category": "sandals"}), ItemChange(601, {"title": "plain"})],
        9: [ItemChange(20, delete=True), ItemChange(12, {"brand": "neo", "category": "caps"})],
        12: [ItemChange(602, {"title": "late", "brand": "acme"})],
    }
    return lambda batch: live.apply(script.get(batch, []))


ITEMS = [10, 11, 12, 13, 20, 21, 500, 600, 601, 602, 3, 999]  # some never in the catalog


def test_the_in_memory_state_equals_the_per_event_paths_with_live_changes() -> None:
    live = LiveCatalog(shop(), None)
    batched = InMemoryStateStore(CatalogAttributes(lambda: live.catalog), config=CONFIG)
    old = InMemoryStateStore(lambda item: per_event(live.catalog, item), config=CONFIG)
    events = random_stream(5, ITEMS)
    apply_in_batches([batched, old], events, 6, live_changes(live))
    assert live.catalog.row(602) >= 0  # every change was made
    assert_same_state(batched, old, 26, exact=True)
    cats = {c for u in range(26) for c, _ in batched.category_affinities(f"u{u}", 100)}
    assert {"boots", "sandals", "caps"} <= cats  # live attributes reached the affinities


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_any(request: pytest.FixtureRequest) -> redis.Redis | RedisCluster:
    name = "redis_client" if request.param == "redis" else "redis_cluster_client"
    client: redis.Redis | RedisCluster = request.getfixturevalue(name)
    return client


def test_the_redis_state_equals_the_per_event_paths_with_live_changes(
    redis_any: redis.Redis | RedisCluster,
) -> None:
    live = LiveCatalog(shop(), None)
    batched = RedisStateStore(
        redis_any, CatalogAttributes(lambda: live.catalog), config=CONFIG, prefix="batch:"
    )
    old = RedisStateStore(
        redis_any, lambda item: per_event(live.catalog, item), config=CONFIG, prefix="old:"
    )
    memory = InMemoryStateStore(CatalogAttributes(lambda: live.catalog), config=CONFIG)
    events = random_stream(7, ITEMS, n=1200)
    apply_in_batches([batched, old, memory], events, 8, live_changes(live))
    assert_same_state(batched, old, 26, exact=True)
    assert_same_state(batched, memory, 26, exact=False)


def test_an_item_added_live_is_tracked_with_its_attributes_and_read_at_once(
    tmp_path: Path,
) -> None:
    live = LiveCatalog(shop(), None)
    store = InMemoryStateStore(CatalogAttributes(lambda: live.catalog))
    ingestor = Ingestor(
        EventLog(tmp_path / "log"),
        store,
        known_items=lambda items: (live.catalog.rows(items) >= 0).tolist(),
    )
    try:
        click = Event.from_wire("c1", "shopper", 600, int(EventType.CLICK), now_ms())
        assert [r.status for r in ingestor.track([click])] == [EventStatus.REJECTED]
        live.apply([ItemChange(600, {"title": "new boot", "category": "boots", "brand": "neo"})])
        results = ingestor.track(
            [click, Event.from_wire("c2", "shopper", 10, int(EventType.CLICK), now_ms())]
        )
        assert [r.status for r in results] == [EventStatus.ACCEPTED] * 2
        state = store.user_state("shopper")  # read your writes: no wait after the ack
        assert state.history == [600, 10]
        assert {c for c, _ in state.categories} == {"boots", "shoes"}
        assert {b for b, _ in state.brands} == {"neo", "acme"}
    finally:
        ingestor.log.close()
