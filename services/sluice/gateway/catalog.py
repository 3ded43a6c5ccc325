"""CatalogService/UpdateItems: the merchant's live catalog changes (sluice.data.updates).

The gateway checks the caller's catalog key, validates the whole batch, embeds the text of
items added since the build with the same MiniLM that embedded the build's, appends the
batch to the update log, and applies it to its own catalogs before it replies: the next page
this gateway serves already has the change. Every other process follows the log.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from sluice.core.auth import StorefrontAuth
from sluice.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from sluice.data.catalog import item_text
from sluice.data.updates import (
    FIELDS,
    TEXT_FIELDS,
    CatalogFeed,
    ItemChange,
    LiveCatalog,
    check_values,
)
from sluice.v1 import catalog_pb2, catalog_pb2_grpc


@dataclass(frozen=True)
class ItemEdit:
    """One requested change, before validation against the catalog."""

    item_id: int
    values: Mapping[str, Any]  # the fields the mask names (every field without a mask)
    delete: bool = False
    full: Mapping[str, Any] | None = None  # every field of the request's item (a new item's)


@dataclass(frozen=True)
class UpdateCounts:
    created: int
    updated: int
    deleted: int
    room_left: int


class CatalogWriter:
    """Turns validated edits into logged, applied changes, one call at a time."""

    def __init__(
        self,
        live: LiveCatalog,
        feed: CatalogFeed,
        encode: Callable[[list[str]], np.ndarray],
        max_updates: int = 1000,
    ) -> None:
        self.live = live
        self.feed = feed
        self.encode = encode
        self.max_updates = max_updates
        self._lock = threading.Lock()  # room is checked and taken by one call at a time

    def update(self, edits: Sequence[ItemEdit]) -> UpdateCounts:
        if not edits:
            raise InvalidArgument("at least one update is required", field_path="updates")
        if len(edits) > self.max_updates:
            raise InvalidArgument(
                f"at most {self.max_updates} updates per call", field_path="updates"
            )
        with self._lock:
            self._sync()  # what other gateways wrote: an item one of them made is no new one
            cat = self.live.catalog
            now = time.time_ns() // 1_000_000
            pending: dict[int, dict[str, Any]] = {}  # ids this batch creates: their values
            changes: list[ItemChange] = []
            to_embed: list[tuple[int, str]] = []  # (change index, text)
            created = updated = deleted = 0
            for i, edit in enumerate(edits):
                where = f"updates[{i}]"
                if edit.item_id <= 0:
                    raise InvalidArgument(
                        "item_id must be 1 or more", field_path=f"{where}.item.item_id"
                    )
                row = cat.row(edit.item_id)
                if edit.delete:
                    deleted += row >= 0 or edit.item_id in pending
                    changes.append(ItemChange(edit.item_id, delete=True, ts_ms=now))
                    continue
                new = row < 0 and edit.item_id not in pending
                values = dict(edit.full if new and edit.full is not None else edit.values)
                if new and "title" not in values:
                    raise InvalidArgument(
                        "a new item needs a title", field_path=f"{where}.item.title"
                    )
                problem = check_values(values)
                if problem is not None:
                    name, why = problem
                    raise InvalidArgument(f"{name} {why}", field_path=f"{where}.item.{name}")
                live_row = new or edit.item_id in pending or row >= cat.build_size
                if live_row and (new or any(k in values for k in TEXT_FIELDS)):
                    merged = pending.get(edit.item_id) or (
                        {"title": cat.titles[row], "description": cat.descriptions[row]}
                        if row >= 0
                        else {}
                    )
                    merged = {**merged, **{k: values[k] for k in TEXT_FIELDS if k in values}}
                    pending[edit.item_id] = merged
                    text = item_text(merged["title"], merged.get("description", ""))
                    to_embed.append((len(changes), text))
                created += new
                updated += not new
                changes.append(ItemChange(edit.item_id, values, ts_ms=now))
            if created > self.live.room_left:
                raise FailedPrecondition(
                    f"the catalog has room for {self.live.room_left} more new items until the "
                    f"next build; this call adds {created}",
                    reason="CATALOG_ROOM_FULL",
                )
            if to_embed:
                vectors = np.asarray(self.encode([t for _, t in to_embed]), dtype=np.float32)
                for (at, _), vec in zip(to_embed, vectors, strict=True):
                    c = changes[at]
                    changes[at] = dataclasses.replace(c, text_vector=vec)
            skipped = self.live.skipped
            try:
                self.feed.log.append(changes)
            except Exception as err:  # the log's store (a file, Redis) failed: nothing is
                # acknowledged; a retry is safe, since every change is an upsert
                raise Unavailable(f"the catalog update log failed: {err}") from err
            self._sync()  # this gateway's next page has the change
            if self.live.skipped > skipped:  # another gateway took the last of the room
                raise FailedPrecondition(
                    f"{self.live.skipped - skipped} new items found no room in the catalog "
                    "(other gateways filled it meanwhile); they wait for the next build",
                    reason="CATALOG_ROOM_FULL",
                )
            return UpdateCounts(created, updated, deleted, self.live.room_left)

    def _sync(self) -> None:
        try:
            self.feed.catch_up()
        except Exception as err:
            raise Unavailable(f"the catalog update log cannot be read: {err}") from err


def edits_from_proto(request: catalog_pb2.UpdateItemsRequest) -> list[ItemEdit]:
    edits = []
    for i, update in enumerate(request.updates):
        item = update.item
        full = {name: getattr(item, name) for name in FIELDS}
        paths = list(update.update_mask.paths)
        for j, path in enumerate(paths):
            if path not in FIELDS:
                raise InvalidArgument(
                    f"{path!r} is not a field that can be updated (one of {', '.join(FIELDS)})",
                    field_path=f"updates[{i}].update_mask.paths[{j}]",
                )
        values = {p: full[p] for p in paths} if paths else full
        edits.append(ItemEdit(int(item.item_id), values, bool(update.delete), full))
    return edits


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """Needs one of the catalog keys; the storefront guard does not apply to it."""

    def __init__(self, keys: Sequence[str], writer: Callable[[], CatalogWriter | None]) -> None:
        self._auth = StorefrontAuth(keys) if keys else None
        self._writer = writer

    def UpdateItems(  # noqa: N802
        self, request: catalog_pb2.UpdateItemsRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.UpdateItemsResponse:
        writer = self._writer()
        if self._auth is None or writer is None:
            raise FailedPrecondition(
                "catalog updates are off: the gateway needs catalog_updates (the update log) "
                "and catalog_api_keys",
                reason="CATALOG_UPDATES_OFF",
            )
        self._auth.identify(dict(context.invocation_metadata()))
        counts = writer.update(edits_from_proto(request))
        return catalog_pb2.UpdateItemsResponse(
            created_count=counts.created,
            updated_count=counts.updated,
            deleted_count=counts.deleted,
            room_left_count=counts.room_left,
        )
