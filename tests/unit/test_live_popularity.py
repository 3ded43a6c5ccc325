"""Recall's live popularity: build-time counts blended with a real Redis state store."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sluice.events.model import Event, EventType
from sluice.recall.live_popularity import BlendConfig, LivePopularity, blend
from sluice.state.store import RedisStateStore, Window

T0 = 1_700_000_000_000
# A catalog of 10 rows whose item ids are not the row numbers; row 9 is cold.
ITEM_IDS = np.array([110, 101, 107, 103, 104, 105, 106, 102, 108, 109], dtype=np.int64)
STATIC = np.array([50, 40, 30, 20, 10, 5, 4, 3, 2, 0], dtype=np.float64)
COLD_ITEM, COLD_ROW = 109, 9

_ids = itertools.count()


class CountingStore:
    """Forwards to a real store and counts the reads (to show requests never read)."""

    def __init__(self, store: RedisStateStore) -> None:
        self.store = store
        self.reads = 0

    def top_popular(self, k: int, *, window: Window = "long") -> list[tuple[int, float]]:
        self.reads += 1
        return self.store.top_popular(k, window=window)

    def trending(self, k: int) -> list[tuple[int, float]]:
        self.reads += 1
        return self.store.trending(k)


@pytest.fixture
def store(redis_client: redis.Redis) -> RedisStateStore:
    return RedisStateStore(redis_client, prefix="livepop:")


def events(item: int, n: int, kind: EventType = EventType.PURCHASE, ts: int = T0) -> list[Event]:
    return [Event(f"e{next(_ids)}", f"user{i}", item, kind, ts + i) for i in range(n)]


def static_rows() -> np.ndarray:
    return np.argsort(-STATIC, kind="stable")


def test_without_live_events_the_build_time_order_is_kept(store: RedisStateStore) -> None:
    pop = LivePopularity(STATIC, ITEM_IDS, store)
    assert pop.refresh()
    assert pop.snapshot.live_weight == 0.0
    np.testing.assert_array_equal(pop.top_rows(10, None), static_rows())
    np.testing.assert_array_equal(pop.top_rows(3, None), static_rows()[:3])


def test_a_burst_of_purchases_lifts_a_cold_item_to_the_top(store: RedisStateStore) -> None:
    pop = LivePopularity(STATIC, ITEM_IDS, store)
    store.apply(events(COLD_ITEM, 20))
    assert pop.refresh()
    assert pop.top_rows(1, None).tolist() == [COLD_ROW]
    # live volume 20 purchases x 8 = 160 weighted events: alpha = 0.7 * 160 / 360
    assert pop.snapshot.live_weight == pytest.approx(0.7 * 160 / 360, rel=1e-4)
    assert pop.snapshot.live_items == 1
    # the others keep their build-time order behind it
    np.testing.assert_array_equal(pop.top_rows(10, None)[1:], static_rows()[:-1])


def test_little_live_traffic_does_not_override_the_build_time_counts(
    store: RedisStateStore,
) -> None:
    pop = LivePopularity(STATIC, ITEM_IDS, store)
    store.apply(events(COLD_ITEM, 1, EventType.VIEW))
    assert pop.refresh()
    # one view (weight 1): alpha = 0.7 / 201, so the cold item scores 0.35 %, under
    # every item with build-time counts (the smallest has 2 / 164 = 1.2 %)
    assert pop.snapshot.live_weight == pytest.approx(0.7 / 201, rel=1e-4)
    np.testing.assert_array_equal(pop.top_rows(10, None), static_rows())


def test_live_volume_shifts_weight_towards_live_up_to_the_maximum() -> None:
    config = BlendConfig(max_live_weight=0.6, pseudo_events=100.0)
    rows = np.array([9], dtype=np.int64)
    no_trend = (np.zeros(0, np.int64), np.zeros(0))
    alphas = [
        blend(STATIC, (rows, np.array([volume])), no_trend, config)[1]
        for volume in (1.0, 100.0, 10_000.0, 1e9)
    ]
    assert alphas == sorted(alphas)
    assert alphas[1] == pytest.approx(0.3)
    assert alphas[-1] == pytest.approx(0.6)
    scores, alpha = blend(STATIC, (rows, np.array([100.0])), no_trend, config)
    assert scores.sum() == pytest.approx(1.0)  # a mix of two distributions
    assert scores[9] == pytest.approx(alpha)


def test_trending_favours_the_item_that_is_new_over_the_steady_one() -> None:
    # two items with the same windowed volume; only item row 8 is trending
    windowed = (np.array([7, 8]), np.array([50.0, 50.0]))
    trending = (np.array([8, 7]), np.array([20.0, 1.0]))
    scores, _ = blend(STATIC * 0, windowed, trending, BlendConfig())
    assert scores[8] > scores[7] > 0


def test_items_not_in_the_catalog_are_ignored(store: RedisStateStore) -> None:
    pop = LivePopularity(STATIC, ITEM_IDS, store)
    store.apply(events(999, 50))  # a live item the build does not know
    assert pop.refresh()
    np.testing.assert_array_equal(pop.top_rows(10, None), static_rows())
    assert pop.rows([109, 999, 110, 0]).tolist() == [9, -1, 0, -1]


def test_filters_apply_inside_the_ranking(store: RedisStateStore) -> None:
    pop = LivePopularity(STATIC, ITEM_IDS, store)
    store.apply(events(COLD_ITEM, 20))
    pop.refresh()
    allowed = np.zeros(10, dtype=bool)
    allowed[[1, 3, 9]] = True
    assert pop.top_rows(10, allowed).tolist() == [9, 1, 3]
    assert pop.top_rows(2, allowed).tolist() == [9, 1]
    allowed[9] = False
    assert pop.top_rows(10, allowed).tolist() == [1, 3]


def test_requests_never_read_the_store(store: RedisStateStore) -> None:
    counting = CountingStore(store)
    pop = LivePopularity(STATIC, ITEM_IDS, counting, BlendConfig(refresh_s=3600.0))
    pop.start()
    try:
        assert counting.reads == 2  # start() reads once: windowed popularity and trending
        store.apply(events(COLD_ITEM, 20))
        for _ in range(1000):
            assert pop.top_rows(5, None)[0] != COLD_ROW  # the cached order until a refresh
        assert counting.reads == 2
    finally:
        pop.close()


def test_the_order_is_refreshed_in_the_background(store: RedisStateStore) -> None:
    pop = LivePopularity(STATIC, ITEM_IDS, store, BlendConfig(refresh_s=0.05))
    pop.start()
    try:
        store.apply(events(COLD_ITEM, 20))
        # The refresher runs every 50 ms on its own thread; wait for the observable
        # outcome (the cold item on top) with a deadline instead of sleeping a fixed time.
        deadline = time.monotonic() + 10.0
        while pop.top_rows(1, None).tolist() != [COLD_ROW]:
            assert time.monotonic() < deadline, "live popularity was never refreshed"
            time.sleep(0.01)
    finally:
        pop.close()
    assert pop.refreshes >= 2


def unreachable_store() -> RedisStateStore:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return RedisStateStore(redis.Redis(port=port, retry=Retry(NoBackoff(), 0)))


class SwitchableStore:
    """A real Redis store that can be swapped for an unreachable one."""

    def __init__(self, up: RedisStateStore) -> None:
        self.up = up
        self.down = unreachable_store()
        self.current = up

    def top_popular(self, k: int, *, window: Window = "long") -> list[tuple[int, float]]:
        return self.current.top_popular(k, window=window)

    def trending(self, k: int) -> list[tuple[int, float]]:
        return self.current.trending(k)


def test_an_unreachable_store_keeps_the_last_order_then_falls_back(
    store: RedisStateStore,
) -> None:
    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    switch = SwitchableStore(store)
    pop = LivePopularity(STATIC, ITEM_IDS, switch, BlendConfig(max_stale_s=30.0), clock=clock)
    store.apply(events(COLD_ITEM, 20))
    assert pop.refresh()
    switch.current = switch.down
    now[0] += 10.0
    assert not pop.refresh()
    assert pop.top_rows(1, None).tolist() == [COLD_ROW], "dropped a fresh live order"
    now[0] += 25.0
    assert not pop.refresh()
    np.testing.assert_array_equal(pop.top_rows(10, None), static_rows())
    assert pop.failures == 2
    switch.current = switch.up
    assert pop.refresh()
    assert pop.top_rows(1, None).tolist() == [COLD_ROW]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_live_weight"):
        BlendConfig(max_live_weight=1.5)
    with pytest.raises(ValueError, match="positive"):
        BlendConfig(pseudo_events=0)
    with pytest.raises(ValueError, match="one entry per catalog row"):
        LivePopularity(STATIC, ITEM_IDS[:3], unreachable_store())
