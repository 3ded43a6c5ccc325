"""User-item interaction logs and the dataset layout Sluice builds from.

Layout of a dataset directory (the one of ``../shared/data/amazon-beauty``):

* ``items.tsv`` — tab-separated with a header; columns ``item_id`` (integer)
  and ``title``; optional columns ``category``, ``brand``, ``color``,
  ``price_cents`` (integer), ``in_stock`` (0/1) and ``description``.
* ``interactions.tsv.gz`` (or ``interactions.tsv``) — tab-separated with a
  header; columns ``user_id``, ``item_id``, ``timestamp`` (unix seconds). A
  user's rows are in time order; ties keep the file order.

A directory in the UniSRec/RecBole layout (``../shared/data/amazon-scientific``)
is read by :mod:`sluice.data.recbole`; :func:`load_data` picks the layout.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sluice.data.catalog import Catalog


@dataclass
class Interactions:
    """Interactions as parallel arrays, grouped by user in time order."""

    user_ids: list[str]  # external user id of each user index
    user_index: np.ndarray  # int32 [m] user index per interaction
    item_rows: np.ndarray  # int64 [m] catalog row per interaction
    timestamps: np.ndarray  # int64 [m] unix seconds

    def __len__(self) -> int:
        return len(self.item_rows)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def sequences(self) -> list[np.ndarray]:
        """Per user index, the catalog rows in time order."""
        order = np.argsort(self.user_index, kind="stable")
        bounds = np.searchsorted(self.user_index[order], np.arange(self.num_users + 1))
        rows = self.item_rows[order]
        return [rows[bounds[u] : bounds[u + 1]] for u in range(self.num_users)]

    def time_sequences(self) -> list[np.ndarray]:
        order = np.argsort(self.user_index, kind="stable")
        bounds = np.searchsorted(self.user_index[order], np.arange(self.num_users + 1))
        ts = self.timestamps[order]
        return [ts[bounds[u] : bounds[u + 1]] for u in range(self.num_users)]

    def drop_last(self, n: int) -> Interactions:
        """The log without each user's last ``n`` interactions (leave-n-out)."""
        if n <= 0:
            return self
        order = np.argsort(self.user_index, kind="stable")
        users = self.user_index[order]
        bounds = np.searchsorted(users, np.arange(self.num_users + 1))
        position = np.arange(len(users)) - bounds[users]
        length = (bounds[1:] - bounds[:-1])[users]
        keep = order[position < length - n]
        keep.sort()
        return Interactions(
            self.user_ids, self.user_index[keep], self.item_rows[keep], self.timestamps[keep]
        )


def _open_text(path: Path) -> object:
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def load_catalog(directory: Path) -> Catalog:
    """Read ``items.tsv`` of a dataset directory."""
    ids: list[int] = []
    titles: list[str] = []
    extra: dict[str, list[str]] = {
        k: [] for k in ("category", "brand", "color", "price_cents", "in_stock", "description")
    }
    with open(directory / "items.tsv", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        present = [k for k in extra if k in (reader.fieldnames or [])]
        for rec in reader:
            ids.append(int(rec["item_id"]))
            titles.append((rec.get("title") or "").strip())
            for k in present:
                extra[k].append(rec.get(k) or "")
    return Catalog.from_columns(
        ids,
        titles,
        categories=extra["category"] or None,
        brands=extra["brand"] or None,
        price_cents=[int(float(p or 0)) for p in extra["price_cents"]] or None,
        in_stock=[s.strip() not in ("0", "false", "False") for s in extra["in_stock"]] or None,
        descriptions=extra["description"] or None,
        colors=extra["color"] or None,
    )


def load_interactions(directory: Path, catalog: Catalog) -> Interactions:
    """Read the interaction log of a dataset directory against its catalog."""
    path = directory / "interactions.tsv.gz"
    if not path.exists():
        path = directory / "interactions.tsv"
    user_of: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    stamps: list[int] = []
    with _open_text(path) as fh:  # type: ignore[attr-defined]
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        iu, ii, it = header.index("user_id"), header.index("item_id"), header.index("timestamp")
        for rec in reader:
            users.append(user_of.setdefault(rec[iu], len(user_of)))
            items.append(int(rec[ii]))
            stamps.append(int(float(rec[it])))
    rows = catalog.rows(items)
    known = rows >= 0
    return Interactions(
        user_ids=list(user_of),
        user_index=np.asarray(users, dtype=np.int32)[known],
        item_rows=rows[known],
        timestamps=np.asarray(stamps, dtype=np.int64)[known],
    )


def load_data(directory: Path, catalog: Catalog | None = None) -> tuple[Catalog, Interactions]:
    """The catalog and interaction log of a dataset directory, in either layout.

    The one place that picks the layout: the RecBole one when
    :func:`sluice.data.recbole.is_recbole` says so, else the one above. With
    ``catalog`` given (the built catalog, for evaluation) only the log is read,
    against it, so the build and the eval see the same interactions.
    """
    from sluice.data.recbole import is_recbole, load_recbole_catalog, load_recbole_interactions

    if is_recbole(directory):
        catalog = catalog if catalog is not None else load_recbole_catalog(directory)
        return catalog, load_recbole_interactions(directory, catalog)
    catalog = catalog if catalog is not None else load_catalog(directory)
    return catalog, load_interactions(directory, catalog)


def write_dataset(directory: Path, catalog: Catalog, interactions: Interactions) -> None:
    """Write a dataset in the layout above (used for the generated default)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "items.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(["item_id", "title", "category", "brand", "color", "price_cents", "in_stock"])
        for r in range(len(catalog)):
            w.writerow(
                [
                    int(catalog.item_ids[r]),
                    catalog.titles[r],
                    catalog.category_of(r),
                    catalog.brand_of(r),
                    catalog.color_of(r),
                    int(catalog.price_cents[r]),
                    int(catalog.in_stock[r]),
                ]
            )
    with gzip.open(directory / "interactions.tsv.gz", "wt", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["user_id", "item_id", "timestamp"])
        for u, r, t in zip(
            interactions.user_index.tolist(),
            interactions.item_rows.tolist(),
            interactions.timestamps.tolist(),
            strict=True,
        ):
            w.writerow([interactions.user_ids[u], int(catalog.item_ids[r]), t])
