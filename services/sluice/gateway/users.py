"""What the gateway knows about a user: offline history joined with live events."""

from __future__ import annotations

from collections.abc import Callable

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


def item_attributes(catalog: Catalog) -> Callable[[int], tuple[str, str] | None]:
    """Item id to (category, brand) for the state store's affinities."""

    def lookup(item_id: int) -> tuple[str, str] | None:
        row = catalog.row(item_id)
        return None if row < 0 else (catalog.category_of(row), catalog.brand_of(row))

    return lookup
