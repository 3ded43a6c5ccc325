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

:class:`InMemoryStateStore` and :class:`RedisStateStore` behave the same. The Redis store
runs on one server or on a Redis Cluster (``redis+cluster://`` URLs): its keys carry hash tags
and each script touches one slot (see the key layout below ``# -- Redis``).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import math
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

import redis
from cachetools import TTLCache
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from sluice.core.errors import Unavailable
from sluice.events.model import WEIGHT_BY_TYPE, Event, EventType

Window = Literal["short", "long"]
ItemAttributes = Callable[[int], "tuple[str, str] | None"]
"""Item id to ``(category, brand)``; None or ``""`` parts for unknown."""
AttributesMany = Callable[[Sequence[int]], "Sequence[tuple[str, str] | None]"]
"""Item ids to their ``(category, brand)`` each, in order (one call per applied batch)."""


@runtime_checkable
class BatchItemAttributes(Protocol):
    """Item attributes that also answer a whole batch at once (``many``): the stores look up
    every item of an ``apply`` with one call instead of one per event."""

    def __call__(self, item_id: int) -> tuple[str, str] | None: ...

    def many(self, item_ids: Sequence[int]) -> Sequence[tuple[str, str] | None]: ...


Attributes = ItemAttributes | BatchItemAttributes | Mapping[int, tuple[str, str]] | None
"""What a store is given: a callable per item, one with ``many``, a mapping, or nothing."""

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
    session_ttl_s: int = 1800
    """How long a search session's state lives after its last turn."""
    max_sessions: int = 100_000
    """Sessions the embedded store keeps at most (the least recently used go first)."""


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

    def session(self, user_id: str, session_id: str) -> str | None:
        """The saved state of a shopper's search session; None: new or expired. Sessions
        belong to the user (or, without one, to the session id alone) and DeleteUser erases
        them with the rest."""
        ...

    def save_session(self, user_id: str, session_id: str, state: str) -> None:
        """Keep a search session's state for ``config.session_ttl_s`` from now."""
        ...

    def trending(self, k: int) -> list[tuple[int, float]]:
        """Items whose short-window rate most exceeds their long-window rate."""
        ...

    def close(self) -> None: ...


def attribute_lookup(attributes: Attributes) -> ItemAttributes:
    """Normalise a mapping or callable of item attributes to a callable."""
    if attributes is None:
        return lambda _item: None
    if isinstance(attributes, Mapping):
        return attributes.get
    return attributes


def attributes_many(attributes: Attributes) -> AttributesMany:
    """Normalise item attributes to a lookup of a whole batch: ``many`` where given, else the
    one-item lookup for each id."""
    if isinstance(attributes, BatchItemAttributes):
        return attributes.many
    one = attribute_lookup(attributes)
    if attributes is None:
        return lambda items: [None] * len(items)
    return lambda items: [one(item) for item in items]


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
        # item ids in an array, not a list: the cyclic collector never walks it (a list of
        # 200 ids per user made each full pass walk every id of every user)
        self.history = array("q")
        self.affinity = _Decayed(half_life, 2)  # categories, brands
        self.suppressed: set[int] = set()
        self.last = 0


class InMemoryStateStore:
    """Embedded, thread-safe state store; rebuilt from the event log on start."""

    persistent = False

    def __init__(
        self,
        attributes: Attributes = None,
        *,
        config: StateConfig | None = None,
    ) -> None:
        self.config = config or StateConfig()
        self._attributes_many = attributes_many(attributes)
        self._lock = threading.RLock()
        # event id -> expiry (monotonic), in expiry order, and event id -> payload digest.
        # Two tables of plain floats and strings, not one of tuples: a dict that holds only
        # those is never tracked by the cyclic collector, while one that takes a fresh tuple
        # is tracked again at each insert, so every young-generation pass walked all of it
        # (an ack p99 that grew with the ids kept; docs/realtime.md)
        self._seen_until: dict[str, float] = {}
        self._seen_digest: dict[str, str] = {}
        self._users: dict[str, _User] = {}
        self._erased: set[str] = set()
        self._short = _Decayed(self.config.popularity_short_half_life_ms, 1)
        self._long = _Decayed(self.config.popularity_long_half_life_ms, 1)
        self._pops = (self._short, self._long)
        self._history_cap = self.config.history_cap
        self._clock = 0
        self._sessions: TTLCache[tuple[str, str], str] = TTLCache(
            self.config.max_sessions, self.config.session_ttl_s
        )

    def _is_seen(self, event_id: str, now: float) -> bool:
        until = self._seen_until.get(event_id)
        return until is not None and until > now

    def forget_user(self, user_id: str) -> None:
        with self._lock:
            self._users.pop(user_id, None)
            self._erased.add(user_id)
            for key in [k for k in self._sessions if k[0] == user_id]:
                self._sessions.pop(key, None)

    def session(self, user_id: str, session_id: str) -> str | None:
        with self._lock:
            return self._sessions.get((user_id, session_id))

    def save_session(self, user_id: str, session_id: str, state: str) -> None:
        with self._lock:
            self._sessions[(user_id, session_id)] = state

    def erased(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._erased

    def digests(self, event_ids: Sequence[str]) -> list[str | None]:
        now = time.monotonic()
        with self._lock:
            return [self._seen_digest[e] if self._is_seen(e, now) else None for e in event_ids]

    def seen(self, event_id: str) -> bool:
        with self._lock:
            return self._is_seen(event_id, time.monotonic())

    def seen_many(self, event_ids: Sequence[str]) -> list[bool]:
        now = time.monotonic()
        with self._lock:
            return [self._is_seen(e, now) for e in event_ids]

    def apply(self, events: Sequence[Event]) -> list[bool]:
        # the batch's attributes in one lookup, outside the lock (the catalog has its own
        # consistency: a live update is visible here or not, as it was to a per-event lookup)
        attributes = self._attributes_many([e.item_id for e in events]) if events else []
        now = time.monotonic()
        expiry = now + self.config.dedupe_ttl_s
        out: list[bool] = []
        with self._lock:
            seen, digests = self._seen_until, self._seen_digest
            while seen:  # drop expired ids; insertion order is expiry order
                first = next(iter(seen))
                if seen[first] > now:
                    break
                del seen[first], digests[first]
            for event, attrs in zip(events, attributes, strict=True):
                if event.event_id in seen:  # everything left is unexpired
                    out.append(False)
                    continue
                seen[event.event_id] = expiry
                digests[event.event_id] = event.digest
                out.append(True)
                self._apply_one(event, attrs)
        return out

    def _apply_one(self, event: Event, attrs: tuple[str, str] | None) -> None:
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
            return (user.history[-limit:] if limit else user.history).tolist()

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
#
# Key layout (``P`` is the prefix, default ``sluice:``). Every key carries a Redis Cluster hash
# tag (the part in braces decides the slot), so that each script below touches one slot:
#
#   P{u:<user>}:seq   list    the user's recent items, most recent last (capped)
#   P{u:<user>}:sup   set     items the user bought
#   P{u:<user>}:sess  hash    the user's search sessions' states by session id (TTL)
#   P{s:<session>}:sess hash  an anonymous search session's state (no user id; TTL)
#   P{u:<user>}:cat   zset    forward-decayed category affinities
#   P{u:<user>}:brand zset    forward-decayed brand affinities
#   P{u:<user>}:meta  hash    last (latest event ms), land (affinity landmark)
#   P{u:<user>}:ev:<event id>   "1", TTL dedupe_ttl_s: this event is in the user's state
#   P{u:<user>}:erased          "1": DeleteUser erased them (build-time history is not served)
#   P{pop}:short / P{pop}:long  zsets  forward-decayed item popularity, 1 h / 24 h half-life
#   P{pop}:meta       hash    clock (latest event ms applied), ls / ll (their landmarks)
#   P{pop}:ev:<event id>        payload digest, TTL dedupe_ttl_s: the event is fully applied
#
# ``<user>`` is the user id with ``%``, ``{`` and ``}`` percent-encoded, so that the tag is
# the whole id. Applying a batch takes one script call per user it touches, then one more:
#
# 1. per user, in the user's slot: for each event not yet marked there, mark it and add it to
#    the user's history, purchases and affinities, atomically (the calls for one master go in
#    one pipeline);
# 2. in the popularity slot: for each event not yet marked there, mark it with its digest and
#    add its weight to both popularity windows, atomically.
#
# Each call is idempotent on its own, guarded by its own marker, so a retried or replayed
# event completes whatever half a crash cut off and never counts twice. The popularity marker
# is written last: it is the commit point that ``seen``/``digests`` read, so an event whose
# user half was applied and whose popularity half was not still reads as new, and its retry
# (or the replay of the log) finishes it. Before step 1, events whose popularity marker exists
# are skipped (fully applied earlier, possibly under another user: an id reused), and an id
# repeated within the batch counts once. Only two gateways applying one id under two users at
# the same instant (a client bug: ids are unique) may both apply their user halves, where the
# in-memory store would take one; popularity still counts it once.

_DECAY_LUA = """
local rescale_after, prune

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

-- Increments are summed per member and written once per call (and before a rescale of
-- their key).
local function flush(keys, pending)
  for i, key in ipairs(keys) do
    for member, inc in pairs(pending[i]) do redis.call('ZINCRBY', key, inc, member) end
    pending[i] = {}
  end
end

local function add(pending, i, member, inc)
  pending[i][member] = (pending[i][member] or 0) + inc
end
"""

# KEYS[1]: the user's meta key (routes the call to the user's slot). ARGV: the user's key
# base ``P{u:<user>}:``, dedupe ttl s, history cap, affinity half-life ms, rescale-after
# half-lives, prune-below, then a JSON array of [id, item (string), type, ts, weight,
# category, brand]. Lua numbers reach Redis with full precision.
_USER_APPLY_LUA = (
    _DECAY_LUA
    + """
local u = ARGV[1]
local ttl = ARGV[2]
local cap = tonumber(ARGV[3])
local h = tonumber(ARGV[4])
rescale_after = tonumber(ARGV[5])
prune = '(' .. ARGV[6]
local events = cjson.decode(ARGV[7])

local aff = {u .. 'cat', u .. 'brand'}
local um = redis.call('HMGET', u .. 'meta', 'last', 'land')
local last, land = tonumber(um[1]), tonumber(um[2])
local pending = {{}, {}}
local items = {}
local out = {}
for n, e in ipairs(events) do
  local eid, item, kind, ts, w, cat, brand = e[1], e[2], e[3], e[4], e[5], e[6], e[7]
  if redis.call('SET', u .. 'ev:' .. eid, '1', 'NX', 'EX', ttl) then
    out[n] = 1
    items[#items + 1] = item
    if kind == 4 then redis.call('SADD', u .. 'sup', item) end
    if land ~= nil and ts - land > rescale_after * h then flush(aff, pending) end
    land = advance(land, ts, h, aff)
    local g = w * 2 ^ ((ts - land) / h)
    if cat ~= '' then add(pending, 1, cat, g) end
    if brand ~= '' then add(pending, 2, brand, g) end
    if last == nil or ts > last then last = ts end
  else
    out[n] = 0
  end
end
flush(aff, pending)
if #items > 0 then
  redis.call('RPUSH', u .. 'seq', unpack(items))
  redis.call('LTRIM', u .. 'seq', -cap, -1)
  redis.call('HSET', u .. 'meta', 'last', last, 'land', land)
end
return out
"""
)

# KEYS[1]: the popularity meta key. ARGV: the popularity key base ``P{pop}:``, dedupe ttl s,
# short and long half-lives ms, rescale-after half-lives, prune-below, then a JSON array of
# [id, digest, item (string), ts, weight].
_POP_APPLY_LUA = (
    _DECAY_LUA
    + """
local p = ARGV[1]
local ttl = ARGV[2]
local h_short, h_long = tonumber(ARGV[3]), tonumber(ARGV[4])
rescale_after = tonumber(ARGV[5])
prune = '(' .. ARGV[6]
local events = cjson.decode(ARGV[7])

local pm = p .. 'meta'
local pshort, plong = {p .. 'short'}, {p .. 'long'}
local meta = redis.call('HMGET', pm, 'clock', 'ls', 'll')
local clock, ls, ll = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
local pending_s, pending_l = {{}}, {{}}
local applied = false
local out = {}
for n, e in ipairs(events) do
  local eid, digest, item, ts, w = e[1], e[2], e[3], e[4], e[5]
  if redis.call('SET', p .. 'ev:' .. eid, digest, 'NX', 'EX', ttl) then
    out[n] = 1
    applied = true
    if clock == nil or ts > clock then clock = ts end
    if ls ~= nil and ts - ls > rescale_after * h_short then flush(pshort, pending_s) end
    ls = advance(ls, ts, h_short, pshort)
    add(pending_s, 1, item, w * 2 ^ ((ts - ls) / h_short))
    if ll ~= nil and ts - ll > rescale_after * h_long then flush(plong, pending_l) end
    ll = advance(ll, ts, h_long, plong)
    add(pending_l, 1, item, w * 2 ^ ((ts - ll) / h_long))
  else
    out[n] = 0
  end
end
flush(pshort, pending_s)
flush(plong, pending_l)
if applied then
  redis.call('HSET', pm, 'clock', clock, 'ls', ls, 'll', ll)
end
return out
"""
)

# KEYS: the user's seq, sup, meta, cat, brand, sess keys, then the erased marker (one slot).
_FORGET_LUA = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('SET', KEYS[7], '1')
return 1
"""

# Every key of a user's state that DeleteUser removes (``user_key(user_id, part)``).
_USER_PARTS = ("seq", "sup", "meta", "cat", "brand", "sess")

RedisClient = redis.Redis | RedisCluster
"""A standalone server's client or a Redis Cluster's (``connect``)."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that name a Redis Cluster, and the scheme of its nodes."""


def connect(url: str, **kwargs: Any) -> RedisClient:
    """A client for ``url``, decoding replies to ``str``.

    ``redis://``, ``rediss://`` and ``unix://`` name one server (redis-py's URL syntax).
    ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for
    TLS) names a Redis Cluster: redis-py's cluster client discovers every node and slot from
    whichever of those seed nodes answers, and follows the cluster through failovers.
    """
    scheme, _, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme.lower())
    if node_scheme is None:
        return redis.Redis.from_url(url, decode_responses=True, **kwargs)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = authority.rpartition("@")
    seeds = [h.strip() for h in hosts.split(",") if h.strip()]
    nodes = []
    for seed in seeds:
        host, colon, port = seed.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster node {seed!r} in {scheme}:// URL needs host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"a {scheme}:// URL needs at least one host:port")
    first = f"{node_scheme}://{userinfo}{at}{seeds[0]}{tail}"
    return RedisCluster.from_url(first, startup_nodes=nodes[1:], decode_responses=True, **kwargs)


_OUT_OF_MEMORY: type[Exception] = getattr(redis.exceptions, "OutOfMemoryError", ReadOnlyError)
# (types-redis lacks OutOfMemoryError; redis-py raises it for "OOM command not allowed")


def redis_down(exc: BaseException) -> bool:
    """Whether a redis-py error means Redis (or part of a cluster) cannot serve now: not
    reachable, timed out, failing over, loading, read-only, out of memory. Anything else
    (a wrong command, a script bug) is a bug and stays one."""
    if isinstance(
        exc,
        redis.ConnectionError  # also BusyLoadingError, MaxConnectionsError
        | redis.TimeoutError
        | ClusterError  # also ClusterDownError, MasterDownError, "TTL exhausted"
        | TryAgainError
        | ReadOnlyError
        | SlotNotCoveredError,
    ):
        return True
    if isinstance(exc, _OUT_OF_MEMORY):
        return True  # maxmemory reached: writes are refused until memory is freed
    # "Redis Cluster cannot be connected": no seed node answered
    return type(exc) is RedisClusterException


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _redis_call(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Report an unreachable, timed-out or failing-over Redis as ``Unavailable``."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (redis.RedisError, RedisClusterException) as exc:
            if not redis_down(exc):
                raise
            raise Unavailable(
                f"redis state store unavailable: {exc}", metadata={"dependency": "redis"}
            ) from exc

    return wrapper


def hash_tag(value: str) -> str:
    """``value`` made safe as the inside of a Redis Cluster hash tag (no braces)."""
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


ScriptCall = tuple[Any, Sequence[str], Sequence[Any]]
"""A registered script (``client.register_script``), its keys and its other arguments."""


MOVED_ELSEWHERE = (AskError, TryAgainError, ClusterDownError, ReadOnlyError)
"""Replies that mean a command did not run on the node it was sent to: its slot moved (MOVED
is an AskError) or is migrating, the cluster is re-forming, or the node became a replica."""


def by_master(client: RedisClient, first_keys: Sequence[str]) -> list[tuple[Any, list[int]]]:
    """Positions of ``first_keys`` grouped by the master that holds each key's slot, with a
    plain client of that master (its own connection pool). One server: one group. redis-py's
    cluster pipeline asks the server for the keys of every script call (``COMMAND GETKEYS``,
    a round trip each); slots computed here cost nothing."""
    if not isinstance(client, RedisCluster):
        return [(client, list(range(len(first_keys))))]
    any_client: Any = client  # (types-redis lacks part of RedisCluster)
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, key in enumerate(first_keys):
        node = any_client.get_node_from_key(key)
        if node.name not in groups:
            groups[node.name] = (any_client.get_redis_connection(node), [])
        groups[node.name][1].append(i)
    return list(groups.values())


def refresh_layout(client: RedisClient) -> None:
    """Re-read which master serves which slot (after a failover or a moved slot)."""
    if isinstance(client, RedisCluster):
        any_client: Any = client
        any_client.nodes_manager.initialize()


def run_scripts(client: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run idempotent ``(script, keys, args)`` calls, each in its first key's slot: one
    pipeline per master; return their results in order. A call the node did not run (script
    not loaded there yet, slot moved elsewhere) is sent again after loading the script or
    re-reading the cluster's layout. A node that cannot be reached raises (redis-py's
    ConnectionError), after the layout is re-read for the next call."""
    results: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    for _ in range(4):
        again: list[int] = []
        moved = False
        try:
            for node, positions in by_master(client, [calls[i][1][0] for i in pending]):
                todo = [pending[p] for p in positions]
                pipe = node.pipeline(transaction=False)
                for i in todo:
                    script, keys, args = calls[i]
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                for i, reply in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                    if isinstance(reply, NoScriptError):
                        node.script_load(calls[i][0].script)
                        again.append(i)
                    elif isinstance(reply, MOVED_ELSEWHERE):
                        moved = True
                        again.append(i)
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        results[i] = reply
        except (redis.ConnectionError, redis.TimeoutError):
            with contextlib.suppress(redis.RedisError, RedisClusterException):
                refresh_layout(client)
            raise
        if not again:
            return results
        if moved:
            refresh_layout(client)
        pending = sorted(again)
    raise ClusterError("script calls kept landing on nodes that do not serve their slots")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


class RedisStateStore:
    """State in Redis: a standalone server or a Redis Cluster (``connect``), with the same key
    layout, so that one user's keys share a slot (see the layout above).

    A connection failure, a timeout or a cluster failing over raises
    ``sluice.core.errors.Unavailable``.

    Idempotency: an event id is marked in the user's slot and in the popularity slot, each
    with a TTL of ``config.dedupe_ttl_s``; ``apply`` skips what either marker covers.
    """

    persistent = True

    def __init__(
        self,
        client: RedisClient,
        attributes: Attributes = None,
        *,
        config: StateConfig | None = None,
        prefix: str = "sluice:",
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces (Redis Cluster hash tags)")
        self.config = config or StateConfig()
        self._r: Any = cast(Any, client)  # (types-redis lacks part of RedisCluster)
        self._attributes_many = attributes_many(attributes)
        self._p = prefix
        self._pop = f"{prefix}{{pop}}:"
        self._user_apply = self._r.register_script(_USER_APPLY_LUA)
        self._pop_apply = self._r.register_script(_POP_APPLY_LUA)
        self._forget = self._r.register_script(_FORGET_LUA)

    @property
    def client(self) -> Any:
        """The ``redis.Redis`` or ``redis.cluster.RedisCluster`` client."""
        return self._r

    @property
    def prefix(self) -> str:
        return self._p

    @property
    def clustered(self) -> bool:
        return isinstance(self._r, RedisCluster)

    def _user_base(self, user_id: str) -> str:
        return f"{self._p}{{u:{hash_tag(user_id)}}}:"

    def user_key(self, user_id: str, part: str) -> str:
        """Key of a user's ``seq`` (list), ``cat``/``brand`` (zsets), ``sup`` (set), ``meta``,
        ``erased``; every one in the user's slot."""
        return self._user_base(user_id) + part

    def event_key(self, event_id: str) -> str:
        """The marker of a fully applied event (its payload digest), in the popularity slot."""
        return f"{self._pop}ev:{event_id}"

    def popularity_key(self, part: str) -> str:
        """``short``/``long`` (zsets) or ``meta`` (hash) of item popularity (one slot)."""
        return self._pop + part

    @classmethod
    def from_url(
        cls,
        url: str,
        attributes: Attributes = None,
        **kwargs: Any,
    ) -> RedisStateStore:
        """``redis://...`` for one server, ``redis+cluster://host:port[,...]`` for a cluster."""
        return cls(connect(url), attributes, **kwargs)

    @_redis_call
    def apply(self, events: Sequence[Event]) -> list[bool]:
        out = [False] * len(events)
        if not events:
            return out
        first: dict[str, int] = {}
        for i, e in enumerate(events):
            first.setdefault(e.event_id, i)  # an id repeated in the batch counts once
        candidates = list(first.values())
        known = self._r.mget([self.event_key(events[i].event_id) for i in candidates])
        todo = [events[i] for i, mark in zip(candidates, known, strict=True) if mark is None]
        if not todo:
            return out
        cfg = self.config
        shared = [repr(RESCALE_AFTER), repr(PRUNE_BELOW)]
        found = self._attributes_many([e.item_id for e in todo])  # one lookup per batch
        by_user: dict[str, list[tuple[Event, tuple[str, str] | None]]] = {}
        for e, attrs in zip(todo, found, strict=True):
            by_user.setdefault(e.user_id, []).append((e, attrs))
        user_calls: list[ScriptCall] = []
        for user_id, user_events in by_user.items():
            rows = []
            for e, attrs in user_events:
                category, brand = attrs or ("", "")
                row = (e.event_id, str(e.item_id), int(e.type), e.timestamp_ms, _WEIGHTS[e.type])
                rows.append((*row, category or "", brand or ""))
            base = self._user_base(user_id)
            args = [base, cfg.dedupe_ttl_s, cfg.history_cap, cfg.affinity_half_life_ms, *shared]
            user_calls.append((self._user_apply, [base + "meta"], [*args, _json(rows)]))
        run_scripts(self._r, user_calls)  # 1: every user's half, before
        pop_rows = [
            (e.event_id, e.digest, str(e.item_id), e.timestamp_ms, _WEIGHTS[e.type]) for e in todo
        ]
        pop_args = [
            self._pop,
            cfg.dedupe_ttl_s,
            cfg.popularity_short_half_life_ms,
            cfg.popularity_long_half_life_ms,
            *shared,
            _json(pop_rows),
        ]
        # 2: the popularity half, whose markers commit the events
        (applied,) = run_scripts(self._r, [(self._pop_apply, [self._pop + "meta"], pop_args)])
        for e, ok in zip(todo, applied, strict=True):
            out[first[e.event_id]] = bool(ok)
        return out

    @_redis_call
    def seen(self, event_id: str) -> bool:
        return bool(self._r.exists(self.event_key(event_id)))

    @_redis_call
    def seen_many(self, event_ids: Sequence[str]) -> list[bool]:
        if not event_ids:
            return []
        values = self._r.mget([self.event_key(e) for e in event_ids])  # one slot
        return [v is not None for v in values]

    @_redis_call
    def forget_user(self, user_id: str) -> None:
        keys = [self.user_key(user_id, part) for part in (*_USER_PARTS, "erased")]
        self._forget(keys=keys)

    def _session_key(self, user_id: str, session_id: str) -> str:
        """The hash of a user's sessions (``sess``); an anonymous session has its own, apart
        from every user's keys."""
        if user_id:
            return self.user_key(user_id, "sess")
        return f"{self._p}{{s:{hash_tag(session_id)}}}:sess"

    @_redis_call
    def session(self, user_id: str, session_id: str) -> str | None:
        value = self._r.hget(self._session_key(user_id, session_id), session_id)
        return None if value is None else _text(value)

    @_redis_call
    def save_session(self, user_id: str, session_id: str, state: str) -> None:
        key = self._session_key(user_id, session_id)
        pipe = self._r.pipeline(transaction=False)  # one key, one slot
        pipe.hset(key, session_id, state)
        pipe.expire(key, self.config.session_ttl_s)  # a user's sessions expire together
        pipe.execute()

    @_redis_call
    def erased(self, user_id: str) -> bool:
        # also the set that recorded erasures before the cluster layout (``P`` + "erased"), so
        # that nobody erased before an upgrade has their build-time history served again
        pipe = self._r.pipeline(transaction=False)
        pipe.exists(self.user_key(user_id, "erased"))
        pipe.sismember(f"{self._p}erased", user_id)
        marked, listed = pipe.execute()
        return bool(marked) or bool(listed)

    @_redis_call
    def digests(self, event_ids: Sequence[str]) -> list[str | None]:
        if not event_ids:
            return []
        values = self._r.mget([self.event_key(e) for e in event_ids])
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
        pipe.hget(self.popularity_key("meta"), "clock")
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
        # the user's keys share a slot; the store clock lives in the popularity slot (on a
        # cluster the pipeline sends each node its part)
        pipe = self._r.pipeline(transaction=False)
        pipe.lrange(self.user_key(user_id, "seq"), -history_limit if history_limit else 0, -1)
        self._queue_affinities(pipe, user_id, "cat", top_k)
        self._queue_affinities(pipe, user_id, "brand", top_k)
        pipe.smembers(self.user_key(user_id, "sup"))
        pipe.hmget(self.user_key(user_id, "meta"), ["last", "land"])
        pipe.hget(self.popularity_key("meta"), "clock")
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
        pipe.zrevrange(self.popularity_key(window), 0, k - 1, withscores=True)
        pipe.hmget(self.popularity_key("meta"), ["clock", "ls" if window == "short" else "ll"])
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
        pipe.zmscore(self.popularity_key("long"), [str(item) for item, _ in short])
        pipe.hmget(self.popularity_key("meta"), ["clock", "ll"])
        raw, (clock, landmark) = pipe.execute()
        h = cfg.popularity_long_half_life_ms
        clock_f, land_f = _num(clock) or 0.0, _num(landmark) or 0.0
        long_scores = [None if s is None else _decay(s, clock_f, land_f, h) for s in raw]
        return _trending(short, long_scores, cfg, k)

    def close(self) -> None:
        self._r.close()


def _json(rows: Any) -> str:
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
