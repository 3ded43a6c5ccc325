"""Online user and item state built from events.

Per user: the recent item sequence (most recent last), time-decayed category
and brand affinities, and the items bought (suppressed from recommendations).
Per item: time-decayed popularity over a short and a long half-life, and a
trending score comparing the two. Plus the set of event ids already applied,
so that applying is idempotent.

Decay uses forward decay with a landmark ``L``: an event of weight ``w`` at
time ``t`` adds ``w * 2**((t - L) / H)``; a score read as of ``T`` is
multiplied by ``2**(-(T - L) / H)``. When ``t`` moves past ``L`` by
``RESCALE_AFTER`` half-lives the stored scores are rescaled and ``L = t``.
Scores are reported as of the store clock, the latest event time applied.
Ties are broken like Redis sorted sets: by the member as a string, descending.

:class:`InMemoryStateStore` and :class:`RedisStateStore` behave the same.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import redis

from sluice.core.errors import Unavailable
from sluice.events.model import WEIGHT_BY_TYPE, Event, EventType

Window = Literal["short", "long"]
ItemAttributes = Callable[[int], "tuple[str, str] | None"]
"""Item id to ``(category, brand)``; None or ``""`` parts for unknown."""

RESCALE_AFTER = 32.0
"""Half-lives a landmark may lag the newest event before scores are rescaled."""
PRUNE_BELOW = 1e-6
"""Scores below this (as of the new landmark) are dropped when rescaling."""
_LN2 = math.log(2.0)
_WEIGHTS = WEIGHT_BY_TYPE
_PURCHASE = int(EventType.PURCHASE)


@dataclass(frozen=True)
class StateConfig:
    """Tunables shared by both stores."""

    history_cap: int = 200
    affinity_half_life_ms: int = 7 * 24 * 3600 * 1000
    popularity_short_half_life_ms: int = 3600 * 1000
    popularity_long_half_life_ms: int = 24 * 3600 * 1000
    dedupe_ttl_s: int = 24 * 3600
    """How long an applied event id is remembered for dedupe (Redis key TTL)."""
    trending_candidates: int = 500
    trending_prior: float = 1.0
    """Weighted events per hour added to both rates of the trending ratio."""


@dataclass(frozen=True)
class UserState:
    """Everything the gateway needs about one user, read in one call."""

    user_id: str
    history: list[int] = field(default_factory=list)
    categories: list[tuple[str, float]] = field(default_factory=list)
    brands: list[tuple[str, float]] = field(default_factory=list)
    suppressed: frozenset[int] = frozenset()
    last_event_ms: int = 0


class OnlineStateStore(Protocol):
    """Online state read by the gateway and recall, written by the ingestor."""

    persistent: bool
    """True when the state outlives this process (so recovery replays only a tail)."""
    config: StateConfig

    def apply(self, events: Sequence[Event]) -> list[bool]:
        """Apply events not seen before and mark them seen; True where applied."""
        ...

    def seen(self, event_id: str) -> bool: ...

    def seen_many(self, event_ids: Sequence[str]) -> list[bool]: ...

    def digests(self, event_ids: Sequence[str]) -> list[str | None]:
        """The payload digest (``Event.digest``) each id was applied with; None: not seen.
        An id marked seen before digests were kept gives ""."""
        ...

    def forget_user(self, user_id: str) -> None:
        """Erase the user's history, purchases and affinities, and remember the erasure
        (``erased``) so that history from the build is not served for them either."""
        ...

    def erased(self, user_id: str) -> bool:
        """Whether the user was erased (their build-time history must not be served)."""
        ...

    def history(self, user_id: str, limit: int | None = None) -> list[int]:
        """Most recent ``limit`` item ids of the user, most recent last."""
        ...

    def category_affinities(self, user_id: str, k: int = 10) -> list[tuple[str, float]]: ...

    def brand_affinities(self, user_id: str, k: int = 10) -> list[tuple[str, float]]: ...

    def suppressed(self, user_id: str) -> frozenset[int]:
        """Items the user bought; never recommend them again."""
        ...

    def user_state(
        self, user_id: str, *, history_limit: int | None = None, top_k: int = 10
    ) -> UserState: ...

    def top_popular(self, k: int, *, window: Window = "long") -> list[tuple[int, float]]:
        """Items with the highest decayed weighted event count, best first."""
        ...

    def trending(self, k: int) -> list[tuple[int, float]]:
        """Items whose short-window rate most exceeds their long-window rate."""
        ...

    def close(self) -> None: ...


def attribute_lookup(
    attributes: ItemAttributes | Mapping[int, tuple[str, str]] | None,
) -> ItemAttributes:
    """Normalise a mapping or callable of item attributes to a callable."""
    if attributes is None:
        return lambda _item: None
    if isinstance(attributes, Mapping):
        return attributes.get
    return attributes


def _decay(score: float, reference: float, landmark: float, half_life: float) -> float:
    return score * math.pow(2.0, -(reference - landmark) / half_life)


def _top(scores: Iterable[tuple[Any, float]], k: int) -> list[tuple[Any, float]]:
    """Best ``k`` by score, ties by member string descending (Redis order)."""
    return heapq.nlargest(k, scores, key=lambda kv: (kv[1], str(kv[0])))


def _trending(
    short: list[tuple[int, float]],
    long_scores: Sequence[float | None],
    config: StateConfig,
    k: int,
) -> list[tuple[int, float]]:
    """Rank candidates by (short rate + prior) / (long rate + prior), rates per hour."""
    hour = 3600 * 1000.0
    short_scale = _LN2 * hour / config.popularity_short_half_life_ms
    long_scale = _LN2 * hour / config.popularity_long_half_life_ms
    prior = config.trending_prior
    scored = [
        (item, (s * short_scale + prior) / ((lg or 0.0) * long_scale + prior))
        for (item, s), lg in zip(short, long_scores, strict=True)
    ]
    return _top(scored, k)


# -- in-memory -----------------------------------------------------------------


class _Decayed:
    """Forward-decayed scores sharing one landmark."""

    __slots__ = ("half_life", "landmark", "tables")

    def __init__(self, half_life: float, n_tables: int) -> None:
        self.half_life = half_life
        self.landmark: float | None = None
        self.tables: list[dict[Any, float]] = [{} for _ in range(n_tables)]

    def advance(self, ts: float) -> float:
        """Move the landmark for an event at ``ts``; return the event's growth factor."""
        landmark = self.landmark
        if landmark is not None and ts - landmark <= RESCALE_AFTER * self.half_life:
            return math.pow(2.0, (ts - landmark) / self.half_life)
        if landmark is not None:
            factor = math.pow(2.0, -(ts - landmark) / self.half_life)
            for i, table in enumerate(self.tables):
                self.tables[i] = {
                    m: s * factor for m, s in table.items() if s * factor >= PRUNE_BELOW
                }
        self.landmark = ts
        return 1.0

    def read(self, table: int, reference: float) -> Iterable[tuple[Any, float]]:
        if self.landmark is None:
            return []
        factor = math.pow(2.0, -(reference - self.landmark) / self.half_life)
        return ((m, s * factor) for m, s in self.tables[table].items())


class _User:
    __slots__ = ("affinity", "history", "last", "suppressed")

    def __init__(self, half_life: float) -> None:
        self.history: list[int] = []
        self.affinity = _Decayed(half_life, 2)  # categories, brands
        self.suppressed: set[int] = set()
        self.last = 0


class InMemoryStateStore:
    """Embedded, thread-safe state store; rebuilt from the event log on start."""

    persistent = False

    def __init__(
        self,
        attributes: ItemAttributes | Mapping[int, tuple[str, str]] | None = None,
        *,
        config: StateConfig | None = None,
    ) -> None:
        self.config = config or StateConfig()
        self._attributes = attribute_lookup(attributes)
        self._lock = threading.RLock()
        # event id -> (expiry (monotonic), payload digest), in expiry order
        self._seen: dict[str, tuple[float, str]] = {}
        self._users: dict[str, _User] = {}
        self._erased: set[str] = set()
        self._short = _Decayed(self.config.popularity_short_half_life_ms, 1)
        self._long = _Decayed(self.config.popularity_long_half_life_ms, 1)
        self._pops = (self._short, self._long)
        self._history_cap = self.config.history_cap
        self._clock = 0

    def _is_seen(self, event_id: str, now: float) -> bool:
        entry = self._seen.get(event_id)
        return entry is not None and entry[0] > now

    def forget_user(self, user_id: str) -> None:
        with self._lock:
            self._users.pop(user_id, None)
            self._erased.add(user_id)

    def erased(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._erased

    def digests(self, event_ids: Sequence[str]) -> list[str | None]:
        now = time.monotonic()
        with self._lock:
            return [self._seen[e][1] if self._is_seen(e, now) else None for e in event_ids]

    def seen(self, event_id: str) -> bool:
        with self._lock:
            return self._is_seen(event_id, time.monotonic())

    def seen_many(self, event_ids: Sequence[str]) -> list[bool]:
        now = time.monotonic()
        with self._lock:
            return [self._is_seen(e, now) for e in event_ids]

    def apply(self, events: Sequence[Event]) -> list[bool]:
        now = time.monotonic()
        expiry = now + self.config.dedupe_ttl_s
        out: list[bool] = []
        with self._lock:
            seen = self._seen
            while seen:  # drop expired ids; insertion order is expiry order
                first = next(iter(seen))
                if seen[first][0] > now:
                    break
                del seen[first]
            for event in events:
                if event.event_id in seen:  # everything left is unexpired
                    out.append(False)
                    continue
                seen[event.event_id] = (expiry, event.digest)
                out.append(True)
                self._apply_one(event)
        return out

    def _apply_one(self, event: Event) -> None:
        ts = event.timestamp_ms
        item = event.item_id
        weight = _WEIGHTS[event.type]
        user = self._users.get(event.user_id)
        if user is None:
            user = self._users[event.user_id] = _User(self.config.affinity_half_life_ms)
        history = user.history
        history.append(item)
        if len(history) > self._history_cap:
            del history[0]
        if event.type == _PURCHASE:
            user.suppressed.add(item)
        attrs = self._attributes(item)
        affinity = user.affinity
        growth = affinity.advance(ts)
        if attrs:
            category, brand = attrs
            if category:
                scores = affinity.tables[0]
                scores[category] = scores.get(category, 0.0) + weight * growth
            if brand:
                scores = affinity.tables[1]
                scores[brand] = scores.get(brand, 0.0) + weight * growth
        if ts > user.last:
            user.last = ts
        if ts > self._clock:
            self._clock = ts
        for pop in self._pops:
            growth = pop.advance(ts)  # may replace the table; read it after
            scores = pop.tables[0]
            scores[item] = scores.get(item, 0.0) + weight * growth

    def history(self, user_id: str, limit: int | None = None) -> list[int]:
        with self._lock:
            user = self._users.get(user_id)
            if user is None:
                return []
            return user.history[-limit:] if limit else list(user.history)

    def _affinities(self, user_id: str, table: int, k: int) -> list[tuple[str, float]]:
        user = self._users.get(user_id)
        if user is None or k <= 0:
            return []
        return _top(user.affinity.read(table, self._clock), k)

    def category_affinities(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        with self._lock:
            return self._affinities(user_id, 0, k)

    def brand_affinities(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        with self._lock:
            return self._affinities(user_id, 1, k)

    def suppressed(self, user_id: str) -> frozenset[int]:
        with self._lock:
            user = self._users.get(user_id)
            return frozenset(user.suppressed) if user else frozenset()

    def user_state(
        self, user_id: str, *, history_limit: int | None = None, top_k: int = 10
    ) -> UserState:
        with self._lock:
            user = self._users.get(user_id)
            if user is None:
                return UserState(user_id)
            return UserState(
                user_id,
                history=self.history(user_id, history_limit),
                categories=self._affinities(user_id, 0, top_k),
                brands=self._affinities(user_id, 1, top_k),
                suppressed=frozenset(user.suppressed),
                last_event_ms=user.last,
            )

    def top_popular(self, k: int, *, window: Window = "long") -> list[tuple[int, float]]:
        pop = self._short if window == "short" else self._long
        with self._lock:
            return _top(pop.read(0, self._clock), k) if k > 0 else []

    def trending(self, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        with self._lock:
            short = _top(self._short.read(0, self._clock), self.config.trending_candidates)
            long_table = self._long.tables[0]
            landmark = self._long.landmark or 0
            long_scores = [
                _decay(long_table.get(item, 0.0), self._clock, landmark, self._long.half_life)
                for item, _ in short
            ]
        return _trending(short, long_scores, self.config, k)

    def close(self) -> None:
        """Nothing to release."""


# -- Redis ---------------------------------------------------------------------

# One round trip per batch. Keys are derived inside the script, so this needs a
# standalone Redis (not Cluster). ARGV: prefix, dedupe ttl s, history cap,
# affinity / short / long half-lives ms, rescale-after half-lives, prune-below,
# then a JSON array of [id, user, item (string), type, ts, weight, category, brand, digest].
# Per event: SET NX (and SADD for a purchase); per user and batch: HMGET,
# RPUSH, LTRIM, HSET and one ZINCRBY per category and brand; per item and
# batch: ZINCRBY x2. Lua numbers reach Redis with full precision.
# Every key the apply script writes for one user (``user_key(user_id, part)``).
_USER_PARTS = ("seq", "sup", "meta", "cat", "brand")

_APPLY_LUA = """
local p = ARGV[1]
local ttl = ARGV[2]
local cap = tonumber(ARGV[3])
local h_aff, h_short, h_long = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local rescale_after = tonumber(ARGV[7])
local prune = '(' .. ARGV[8]
local events = cjson.decode(ARGV[9])

local function advance(land, ts, h, keys)
  if land == nil then return ts end
  if ts - land > rescale_after * h then
    local factor = 2 ^ (-(ts - land) / h)
    for _, key in ipairs(keys) do
      redis.call('ZUNIONSTORE', key, 1, key, 'WEIGHTS', factor)
      redis.call('ZREMRANGEBYSCORE', key, '-inf', prune)
    end
    return ts
  end
  return land
end

local pm = p .. 'pop:meta'
local pshort, plong = {p .. 'pop:short'}, {p .. 'pop:long'}
local meta = redis.call('HMGET', pm, 'clock', 'ls', 'll')
local clock, ls, ll = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])

-- Increments are summed per member and written once per batch (and before a
-- rescale of their key).
local function flush(keys, pending)
  for i, key in ipairs(keys) do
    for member, inc in pairs(pending[i]) do redis.call('ZINCRBY', key, inc, member) end
    pending[i] = {}
  end
end
local function add(pending, i, member, inc)
  pending[i][member] = (pending[i][member] or 0) + inc
end

local pop_pending_s, pop_pending_l = {{}}, {{}}
local users, order = {}, {}
local out = {}
for n, e in ipairs(events) do
  local eid, uid, item, kind, ts, w, cat, brand = e[1], e[2], e[3], e[4], e[5], e[6], e[7], e[8]
  if redis.call('SET', p .. 'seen:' .. eid, e[9], 'NX', 'EX', ttl) then
    out[n] = 1
    local st = users[uid]
    if st == nil then
      local u = p .. 'u:' .. uid
      local um = redis.call('HMGET', u .. ':meta', 'last', 'land')
      st = {last = tonumber(um[1]), land = tonumber(um[2]), key = u, items = {},
            aff = {u .. ':cat', u .. ':brand'}, pending = {{}, {}}}
      users[uid] = st
      order[#order + 1] = st
    end
    st.items[#st.items + 1] = item
    if kind == 4 then redis.call('SADD', st.key .. ':sup', item) end
    if st.land ~= nil and ts - st.land > rescale_after * h_aff then flush(st.aff, st.pending) end
    st.land = advance(st.land, ts, h_aff, st.aff)
    local g = w * 2 ^ ((ts - st.land) / h_aff)
    if cat ~= '' then add(st.pending, 1, cat, g) end
    if brand ~= '' then add(st.pending, 2, brand, g) end
    if st.last == nil or ts > st.last then st.last = ts end
    if clock == nil or ts > clock then clock = ts end
    if ls ~= nil and ts - ls > rescale_after * h_short then flush(pshort, pop_pending_s) end
    ls = advance(ls, ts, h_short, pshort)
    add(pop_pending_s, 1, item, w * 2 ^ ((ts - ls) / h_short))
    if ll ~= nil and ts - ll > rescale_after * h_long then flush(plong, pop_pending_l) end
    ll = advance(ll, ts, h_long, plong)
    add(pop_pending_l, 1, item, w * 2 ^ ((ts - ll) / h_long))
  else
    out[n] = 0
  end
end
flush(pshort, pop_pending_s)
flush(plong, pop_pending_l)
for _, st in ipairs(order) do
  flush(st.aff, st.pending)
  redis.call('RPUSH', st.key .. ':seq', unpack(st.items))
  redis.call('LTRIM', st.key .. ':seq', -cap, -1)
  redis.call('HSET', st.key .. ':meta', 'last', st.last, 'land', st.land)
end
if #order > 0 then
  redis.call('HSET', pm, 'clock', clock, 'ls', ls, 'll', ll)
end
return out
"""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _redis_call(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Report an unreachable or timed-out Redis as ``Unavailable``."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(
                f"redis state store unavailable: {exc}", metadata={"dependency": "redis"}
            ) from exc

    return wrapper


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


class RedisStateStore:
    """State in Redis (standalone); ``apply`` is one atomic script call per batch.

    A connection failure or timeout raises ``sluice.core.errors.Unavailable``.

    Idempotency: each applied event id is kept as ``{prefix}seen:{id}`` with a
    TTL of ``config.dedupe_ttl_s``.
    """

    persistent = True

    def __init__(
        self,
        client: redis.Redis,
        attributes: ItemAttributes | Mapping[int, tuple[str, str]] | None = None,
        *,
        config: StateConfig | None = None,
        prefix: str = "sluice:",
    ) -> None:
        self.config = config or StateConfig()
        self._r = client
        self._attributes = attribute_lookup(attributes)
        self._p = prefix
        self._apply = client.register_script(_APPLY_LUA)

    @property
    def client(self) -> redis.Redis:
        return self._r

    @property
    def prefix(self) -> str:
        return self._p

    def user_key(self, user_id: str, part: str) -> str:
        """Key of a user's ``seq`` (list), ``cat``/``brand`` (zsets), ``sup`` (set), ``meta``."""
        return f"{self._p}u:{user_id}:{part}"

    @classmethod
    def from_url(
        cls,
        url: str,
        attributes: ItemAttributes | Mapping[int, tuple[str, str]] | None = None,
        **kwargs: Any,
    ) -> RedisStateStore:
        client = redis.Redis.from_url(url, decode_responses=True)
        return cls(client, attributes, **kwargs)

    @_redis_call
    def apply(self, events: Sequence[Event]) -> list[bool]:
        if not events:
            return []
        cfg = self.config
        args: list[Any] = [
            self._p,
            cfg.dedupe_ttl_s,
            cfg.history_cap,
            cfg.affinity_half_life_ms,
            cfg.popularity_short_half_life_ms,
            cfg.popularity_long_half_life_ms,
            repr(RESCALE_AFTER),
            repr(PRUNE_BELOW),
        ]
        lookup = self._attributes
        rows = []
        for e in events:
            category, brand = lookup(e.item_id) or ("", "")
            rows.append(
                (
                    e.event_id,
                    e.user_id,
                    str(e.item_id),
                    int(e.type),
                    e.timestamp_ms,
                    _WEIGHTS[e.type],
                    category or "",
                    brand or "",
                    e.digest,
                )
            )
        args.append(json.dumps(rows, ensure_ascii=False, separators=(",", ":")))
        result = self._apply(args=args)
        return [bool(x) for x in result]

    @_redis_call
    def seen(self, event_id: str) -> bool:
        return bool(self._r.exists(f"{self._p}seen:{event_id}"))

    @_redis_call
    def seen_many(self, event_ids: Sequence[str]) -> list[bool]:
        if not event_ids:
            return []
        values = self._r.mget([f"{self._p}seen:{e}" for e in event_ids])
        return [v is not None for v in values]

    @_redis_call
    def forget_user(self, user_id: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(*(self.user_key(user_id, part) for part in _USER_PARTS))
        pipe.sadd(f"{self._p}erased", user_id)
        pipe.execute()

    @_redis_call
    def erased(self, user_id: str) -> bool:
        return bool(self._r.sismember(f"{self._p}erased", user_id))

    @_redis_call
    def digests(self, event_ids: Sequence[str]) -> list[str | None]:
        if not event_ids:
            return []
        values = self._r.mget([f"{self._p}seen:{e}" for e in event_ids])
        return [None if v is None else ("" if v == "1" else str(v)) for v in values]

    @_redis_call
    def history(self, user_id: str, limit: int | None = None) -> list[int]:
        start = -limit if limit else 0
        return [int(x) for x in self._r.lrange(self.user_key(user_id, "seq"), start, -1)]

    def _queue_affinities(self, pipe: Any, user_id: str, part: str, k: int) -> None:
        pipe.zrevrange(self.user_key(user_id, part), 0, max(k, 1) - 1, withscores=True)

    def _scale(
        self, rows: Sequence[tuple[Any, float]], clock: float | None, landmark: float | None, h: int
    ) -> list[tuple[str, float]]:
        if landmark is None or clock is None:
            return []
        return [(_text(m), _decay(s, clock, landmark, h)) for m, s in rows]

    @_redis_call
    def _affinities(self, user_id: str, part: str, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        pipe = self._r.pipeline(transaction=False)
        self._queue_affinities(pipe, user_id, part, k)
        pipe.hget(self.user_key(user_id, "meta"), "land")
        pipe.hget(f"{self._p}pop:meta", "clock")
        rows, land, clock = pipe.execute()
        return self._scale(rows, _num(clock), _num(land), self.config.affinity_half_life_ms)

    def category_affinities(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        return self._affinities(user_id, "cat", k)

    def brand_affinities(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        return self._affinities(user_id, "brand", k)

    @_redis_call
    def suppressed(self, user_id: str) -> frozenset[int]:
        return frozenset(int(x) for x in self._r.smembers(self.user_key(user_id, "sup")))

    @_redis_call
    def user_state(
        self, user_id: str, *, history_limit: int | None = None, top_k: int = 10
    ) -> UserState:
        pipe = self._r.pipeline(transaction=False)
        pipe.lrange(self.user_key(user_id, "seq"), -history_limit if history_limit else 0, -1)
        self._queue_affinities(pipe, user_id, "cat", top_k)
        self._queue_affinities(pipe, user_id, "brand", top_k)
        pipe.smembers(self.user_key(user_id, "sup"))
        pipe.hmget(self.user_key(user_id, "meta"), ["last", "land"])
        pipe.hget(f"{self._p}pop:meta", "clock")
        seq, cats, brands, sup, (last, land), clock = pipe.execute()
        if last is None:
            return UserState(user_id)
        h = self.config.affinity_half_life_ms
        return UserState(
            user_id,
            history=[int(x) for x in seq],
            categories=self._scale(cats, _num(clock), _num(land), h) if top_k > 0 else [],
            brands=self._scale(brands, _num(clock), _num(land), h) if top_k > 0 else [],
            suppressed=frozenset(int(x) for x in sup),
            last_event_ms=int(float(last)),
        )

    def _popular(self, window: Window, k: int) -> list[tuple[int, float]]:
        pipe = self._r.pipeline(transaction=False)
        pipe.zrevrange(f"{self._p}pop:{window}", 0, k - 1, withscores=True)
        pipe.hmget(f"{self._p}pop:meta", ["clock", "ls" if window == "short" else "ll"])
        rows, (clock, landmark) = pipe.execute()
        cfg = self.config
        h = (
            cfg.popularity_short_half_life_ms
            if window == "short"
            else cfg.popularity_long_half_life_ms
        )
        return [(int(m), s) for m, s in self._scale(rows, _num(clock), _num(landmark), h)]

    @_redis_call
    def top_popular(self, k: int, *, window: Window = "long") -> list[tuple[int, float]]:
        return self._popular(window, k) if k > 0 else []

    @_redis_call
    def trending(self, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        cfg = self.config
        short = self._popular("short", cfg.trending_candidates)
        if not short:
            return []
        pipe = self._r.pipeline(transaction=False)
        pipe.zmscore(f"{self._p}pop:long", [str(item) for item, _ in short])
        pipe.hmget(f"{self._p}pop:meta", ["clock", "ll"])
        raw, (clock, landmark) = pipe.execute()
        h = cfg.popularity_long_half_life_ms
        clock_f, land_f = _num(clock) or 0.0, _num(landmark) or 0.0
        long_scores = [None if s is None else _decay(s, clock_f, land_f, h) for s in raw]
        return _trending(short, long_scores, cfg, k)

    def close(self) -> None:
        self._r.close()
