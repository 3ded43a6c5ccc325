"""What the gateway knows about a user: offline history joined with live events."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.state.store import OnlineStateStore


class UserHistory:
    """History = the user's interactions from the build, then their live events."""

    def __init__(self, offline: dict[str, np.ndarray], store: OnlineStateStore) -> None:
        self.offline = offline
        self.store = store

    @classmethod
    def from_artifacts(cls, artifacts: Artifacts, store: OnlineStateStore) -> UserHistory:
        ids, histories = artifacts.users()
        return cls(dict(zip(ids, histories, strict=True)), store)

    def history(self, user_id: str, limit: int) -> np.ndarray:
        live = np.asarray(self.store.history(user_id, limit), dtype=np.int64)
        past = self.offline.get(user_id)
        if past is not None and self.store.erased(user_id):
            past = None  # erased (DeleteUser): the build's history of them is not served
        if past is None or len(live) >= limit:
            return live[-limit:]
        return np.concatenate([past, live])[-limit:].astype(np.int64)

    def suppressed(self, user_id: str) -> np.ndarray:
        return np.fromiter(self.store.suppressed(user_id), dtype=np.int64)


class CatalogAttributes:
    """Item id to ``(category, brand)`` for the state store's affinities, read from the
    catalog that ``catalog_of`` returns at each call (the current build's, live updates
    included): None for an id the catalog does not hold.

    :meth:`many` answers a whole batch with one ``Catalog.rows`` lookup and two array reads
    (what the stores use, once per ``apply``); calling the object answers one id the same
    way."""

    __slots__ = ("_catalog_of",)

    def __init__(self, catalog_of: Callable[[], Catalog]) -> None:
        self._catalog_of = catalog_of

    def __call__(self, item_id: int) -> tuple[str, str] | None:
        return self.many((item_id,))[0]

    def many(self, item_ids: Sequence[int]) -> list[tuple[str, str] | None]:
        return attributes_of(self._catalog_of(), item_ids)


def attributes_of(catalog: Catalog, item_ids: Sequence[int]) -> list[tuple[str, str] | None]:
    """``(category, brand)`` of each id in ``catalog``, None for an id it does not hold (an id
    outside int64 cannot be an item: None too)."""
    n = len(item_ids)
    if n == 0:
        return []
    try:
        ids = np.fromiter(item_ids, dtype=np.int64, count=n)
    except OverflowError:  # an id outside int64 is no item
        fits = [-(1 << 63) <= i < 1 << 63 for i in item_ids]
        inner = iter(
            attributes_of(catalog, [i for i, ok in zip(item_ids, fits, strict=True) if ok])
        )
        return [next(inner) if ok else None for ok in fits]
    rows = catalog.rows(ids)
    known = rows >= 0
    if not known.any():
        return [None] * n
    at = np.where(known, rows, 0)
    # the vocabularies are read after the codes: a live update appends a name before any row
    # holds its code, so every code read here has its name
    category_codes = catalog.category_codes[at].tolist()
    brand_codes = catalog.brand_codes[at].tolist()
    categories, brands = catalog.categories, catalog.brands
    return [
        (categories[c], brands[b]) if k else None
        for k, c, b in zip(known.tolist(), category_codes, brand_codes, strict=True)
    ]


def item_attributes(catalog: Catalog) -> CatalogAttributes:
    """Item id to (category, brand) in ``catalog`` for the state store's affinities."""
    return CatalogAttributes(lambda: catalog)
