"""User events: the domain type, its validation and the per-event outcome of a Track call."""

from __future__ import annotations

import enum
import hashlib
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

MAX_EVENT_ID_CHARS = 128
MAX_USER_ID_CHARS = 256
MAX_QUERY_CHARS = 1024
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
"""An event stamped further ahead of the server clock than this is rejected."""
MAX_AGE_MS = 23 * 3600 * 1000
"""An event older than this is rejected: live state is about now (history for training comes
from the build), and an event id older than the dedupe window (24 h) could be applied twice."""


class EventType(enum.IntEnum):
    """What the user did; the numbers match ``sluice.v1.EventType``."""

    VIEW = 1
    CLICK = 2
    ADD_TO_CART = 3
    PURCHASE = 4
    ERASE = 9
    """Internal, never accepted from a client: a marker in the event log that the user was
    erased (DeleteUser), so that a replay erases them again."""


EVENT_WEIGHTS: dict[EventType, float] = {
    EventType.VIEW: 1.0,
    EventType.CLICK: 2.0,
    EventType.ADD_TO_CART: 4.0,
    EventType.PURCHASE: 8.0,
}
"""Weight of one event in affinities and popularity."""

_TYPE_VALUES = frozenset(int(t) for t in EventType)
_BY_VALUE = {int(k): v for k, v in EVENT_WEIGHTS.items()}
WEIGHT_BY_TYPE: tuple[float, ...] = tuple(
    _BY_VALUE.get(t, 0.0) for t in range(max(_TYPE_VALUES) + 1)
)
"""EVENT_WEIGHTS indexed by the type number (fast path)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One user event. ``timestamp_ms`` is unix epoch milliseconds."""

    event_id: str
    user_id: str
    item_id: int
    type: EventType
    timestamp_ms: int
    query: str = ""
    # the user's experiment arms when the event arrived, "experiment=arm,…" (the event
    # stream's per-arm label; not part of what a retry must repeat)
    arms: str = ""

    @property
    def weight(self) -> float:
        return EVENT_WEIGHTS[self.type]

    def at(self, timestamp_ms: int) -> Event:
        """This event with another timestamp (``dataclasses.replace``, without its cost on
        Track's path: a field added above must be added here too)."""
        return Event(
            self.event_id,
            self.user_id,
            self.item_id,
            self.type,
            timestamp_ms,
            self.query,
            self.arms,
        )

    @property
    def digest(self) -> str:
        """What a retry of this event must repeat: its user, item, type and query (not the
        timestamp, which the server sets for a client that sent 0)."""
        key = f"{self.user_id}\x1f{self.item_id}\x1f{int(self.type)}\x1f{self.query}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @classmethod
    def from_wire(
        cls,
        event_id: str,
        user_id: str,
        item_id: int,
        type_value: int,
        timestamp_ms: int,
        query: str = "",
    ) -> Event:
        """Build from raw (proto) values; an unknown type number is kept for
        :func:`validate_event` to reject."""
        kind = EventType(type_value) if type_value in _TYPE_VALUES else type_value
        return cls(event_id, user_id, item_id, cast(EventType, kind), timestamp_ms, query)


class EventStatus(enum.IntEnum):
    """Outcome of one event; the numbers match ``sluice.v1.EventStatus``."""

    ACCEPTED = 1
    DUPLICATE = 2
    REJECTED = 3
    CONFLICT = 4


@dataclass(frozen=True, slots=True)
class EventResult:
    """Outcome of one event of a batch; ``error`` is set only when rejected."""

    status: EventStatus
    error: str = ""


ACCEPTED = EventResult(EventStatus.ACCEPTED)
DUPLICATE = EventResult(EventStatus.DUPLICATE)
CONFLICT = EventResult(
    EventStatus.CONFLICT, "this event_id was used before for another event; not applied"
)


def erase_marker(user_id: str, at_ms: int) -> Event:
    """The event log's record of a DeleteUser call."""
    return Event(f"erase:{user_id}:{at_ms}", user_id, 0, EventType.ERASE, at_ms)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def validate_id(name: str, value: str, limit: int) -> str | None:
    """Why an id is unacceptable (empty, too long, blank, control characters), or None."""
    if not value:
        return f"{name} is empty"
    if len(value) > limit:
        return f"{name} is longer than {limit} characters"
    if value.isascii() and value.isprintable():  # the usual id: no control characters
        return None if value.strip() else f"{name} is blank"
    if not value.strip():
        return f"{name} is blank"
    if any(unicodedata.category(c).startswith("C") for c in value):
        return f"{name} contains control or unassigned characters"
    return None


def validate_event(
    event: Event,
    *,
    now: int | None = None,
    known_item: Callable[[int], bool] | None = None,
    max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
    max_age_ms: int = MAX_AGE_MS,
) -> str | None:
    """Return why ``event`` is unacceptable, or None when it is fine.

    ``now`` is the server clock in epoch ms (default: the current time);
    ``known_item`` tells whether an item id exists in the catalog.
    """
    for name, value, limit in (
        ("event_id", event.event_id, MAX_EVENT_ID_CHARS),
        ("user_id", event.user_id, MAX_USER_ID_CHARS),
    ):
        reason = validate_id(name, value, limit)
        if reason is not None:
            return reason
    if len(event.query) > MAX_QUERY_CHARS:
        return f"query is longer than {MAX_QUERY_CHARS} characters"
    if event.type not in EVENT_WEIGHTS:
        return f"unknown event type {int(event.type)}"
    if event.item_id <= 0:
        return f"item_id must be positive, got {event.item_id}"
    if event.item_id >= 1 << 63:
        return "item_id does not fit in int64"
    if event.timestamp_ms <= 0:
        return f"timestamp_ms must be positive, got {event.timestamp_ms}"
    current = now_ms() if now is None else now
    if event.timestamp_ms > current + max_future_skew_ms:
        return (
            f"timestamp_ms is {event.timestamp_ms - current} ms in the future "
            f"(at most {max_future_skew_ms} allowed)"
        )
    if event.timestamp_ms < current - max_age_ms:
        return (
            f"timestamp_ms is {(current - event.timestamp_ms) // 1000} s in the past "
            f"(at most {max_age_ms // 1000} s allowed)"
        )
    if known_item is not None and not known_item(event.item_id):
        return f"item {event.item_id} is not in the catalog"
    return None
