"""The item catalog: ids, text and filterable attributes as column arrays.

Row ``r`` (0-based) of every column is one item. Models use the *dense index*
``r + 1`` and reserve 0 for padding; :meth:`Catalog.rows` maps external item
ids to rows.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNKNOWN = "unknown"
STRING_ATTRIBUTES = ("category", "brand", "color")
WORD_ATTRIBUTES = ("title_words",)  # values are words; an item matches one its title has
NUMERIC_ATTRIBUTES = ("price_cents",)
BOOL_ATTRIBUTES = ("in_stock",)
FILTERABLE = STRING_ATTRIBUTES + WORD_ATTRIBUTES + NUMERIC_ATTRIBUTES + BOOL_ATTRIBUTES
_WORD = re.compile(r"\w+")


def item_text(title: str, description: str = "") -> str:
    """An item's text as the build embeds it: the title, then the description if any."""
    return f"{title}. {description}" if description else title


def words(text: str) -> list[str]:
    """The lower-case words of a title or of a title-word filter's value."""
    return _WORD.findall(text.lower())


@dataclass
class Catalog:
    """Column store of the catalog."""

    item_ids: np.ndarray  # int64 [n]
    titles: list[str]
    category_codes: np.ndarray  # int32 [n] into categories
    categories: list[str]
    brand_codes: np.ndarray  # int32 [n] into brands
    brands: list[str]
    price_cents: np.ndarray  # int64 [n]
    in_stock: np.ndarray  # bool [n]
    descriptions: list[str] = field(default_factory=list)
    # the item's colour (builds before colours, or items without one: "unknown")
    color_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    colors: list[str] = field(default_factory=list)
    # Live catalog updates (sluice.data.updates): a serving copy has room for items added
    # after the build. Rows [0, build_size) are the build's (the models know them); rows
    # [build_size, live_end) were added live; rows [live_end, len) are empty room. ``hidden``
    # rows (deleted items and the empty room) are never served.
    hidden: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    build_size: int = -1  # -1: every row is the build's
    index: RowIndex = field(init=False, repr=False)
    live_end: int = field(init=False, repr=False)
    version: int = field(default=0, init=False, repr=False)  # counts applied update batches
    deleted: int = field(default=0, init=False, repr=False)  # hidden rows below live_end
    _title_words: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)
    _title_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if not self.colors:
            self.colors, self.color_codes = [UNKNOWN], np.zeros(n, np.int32)
        self.color_codes = np.asarray(self.color_codes, dtype=np.int32)
        for name in ("category_codes", "brand_codes", "color_codes", "price_cents", "in_stock"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"catalog column {name} has {len(getattr(self, name))} rows, not {n}"
                )
        if len(self.titles) != n:
            raise ValueError("catalog titles do not match item ids")
        if self.build_size < 0:
            self.build_size = n
        if len(self.hidden) != n:
            self.hidden = np.zeros(n, bool)
            self.hidden[self.build_size :] = True
        self.live_end = self.build_size
        self.index = RowIndex(self.item_ids[: self.live_end])

    def with_room(self, room: int) -> Catalog:
        """A serving copy with ``room`` empty (hidden) rows for items added live: no id, no
        text, of unknown category, brand and colour."""
        n = len(self)

        def pad(a: np.ndarray, fill: object) -> np.ndarray:
            return np.concatenate([a, np.full(room, fill, dtype=a.dtype)])

        def vocab(names: list[str]) -> tuple[list[str], int]:
            names = list(names)
            if UNKNOWN not in names:
                names.append(UNKNOWN)
            return names, names.index(UNKNOWN)

        categories, category = vocab(self.categories)
        brands, brand = vocab(self.brands)
        colors, color = vocab(self.colors)
        return Catalog(
            item_ids=pad(self.item_ids, -1),
            titles=self.titles + [""] * room,
            category_codes=pad(self.category_codes, category),
            categories=categories,
            brand_codes=pad(self.brand_codes, brand),
            brands=brands,
            price_cents=pad(self.price_cents, 0),
            in_stock=pad(self.in_stock, False),
            descriptions=(self.descriptions or [""] * n) + [""] * room,
            color_codes=pad(self.color_codes, color),
            colors=colors,
            build_size=n,
        )

    def code_of(self, attribute: str, value: str) -> int:
        """``value``'s code in a string attribute's vocabulary, added when new (live updates;
        the vocabulary only grows, so codes already handed out stay valid)."""
        names, _ = self.values_of(attribute)
        value = value or UNKNOWN
        if value not in names:
            names.append(value)
        return names.index(value)

    def publish(self, end: int, new_rows: Sequence[int] = ()) -> None:
        """Make rows up to ``end`` findable by id (their columns are written first), and add
        the titles of ``new_rows`` to the title-word index."""
        index = self._title_words
        if index is not None and len(new_rows):
            with self._title_lock:
                for row in new_rows:
                    for w in set(words(self.titles[row])):
                        index[w] = np.union1d(index.get(w, np.zeros(0, np.int64)), [row])
        if end != self.live_end:  # new rows: their ids join the index
            self.index = RowIndex(self.item_ids[:end])
        self.live_end = end
        self.deleted = int(np.count_nonzero(self.hidden[:end]))
        self.version += 1

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the given external ids; -1 for ids not in the catalog."""
        return self.index.rows(item_ids)

    def row(self, item_id: int) -> int:
        return self.index.row(item_id)

    def contains(self, item_id: int) -> bool:
        return self.index.row(item_id) >= 0

    def take(self, rows: np.ndarray) -> Catalog:
        """The catalog of ``rows`` only, in that order (a recall shard's slice)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Catalog(
            item_ids=self.item_ids[rows],
            titles=[self.titles[r] for r in rows.tolist()],
            category_codes=self.category_codes[rows],
            categories=self.categories,
            brand_codes=self.brand_codes[rows],
            brands=self.brands,
            price_cents=self.price_cents[rows],
            in_stock=self.in_stock[rows],
            descriptions=[self.descriptions[r] for r in rows.tolist()] if self.descriptions else [],
            color_codes=self.color_codes[rows],
            colors=self.colors,
        )

    def text(self, row: int) -> str:
        """Text that represents an item for embedding and lexical match."""
        return item_text(self.titles[row], self.descriptions[row] if self.descriptions else "")

    def category_of(self, row: int) -> str:
        return self.categories[self.category_codes[row]]

    def brand_of(self, row: int) -> str:
        return self.brands[self.brand_codes[row]]

    def color_of(self, row: int) -> str:
        return self.colors[self.color_codes[row]]

    def rows_with_words(self, text: str) -> np.ndarray:
        """Rows whose title has every word of ``text`` (any case), in row order. The index
        of title words is built on first use (a few seconds at a million items)."""
        index = self._title_words
        if index is None:
            with self._title_lock:
                if self._title_words is None:
                    self._title_words = _word_index(self.titles[: self.live_end])
                index = self._title_words
        found: np.ndarray | None = None
        for word in words(text) or [""]:
            rows = index.get(word, np.zeros(0, np.int64))
            found = rows if found is None else np.intersect1d(found, rows, assume_unique=True)
        return found if found is not None else np.zeros(0, np.int64)

    def values_of(self, attribute: str) -> tuple[list[str], np.ndarray]:
        """A string attribute's vocabulary and each row's code into it."""
        if attribute == "category":
            return self.categories, self.category_codes
        if attribute == "brand":
            return self.brands, self.brand_codes
        if attribute == "color":
            return self.colors, self.color_codes
        raise KeyError(attribute)

    # -- persistence -------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(
            directory / "catalog.npz",
            item_ids=self.item_ids,
            category_codes=self.category_codes,
            brand_codes=self.brand_codes,
            color_codes=self.color_codes,
            price_cents=self.price_cents,
            in_stock=self.in_stock,
        )
        with open(directory / "catalog_text.json", "w") as fh:
            json.dump(
                {
                    "titles": self.titles,
                    "descriptions": self.descriptions,
                    "categories": self.categories,
                    "brands": self.brands,
                    "colors": self.colors,
                },
                fh,
            )

    @classmethod
    def load(cls, directory: Path) -> Catalog:
        arrays = np.load(directory / "catalog.npz")
        with open(directory / "catalog_text.json") as fh:
            text = json.load(fh)
        return cls(
            item_ids=arrays["item_ids"],
            titles=text["titles"],
            category_codes=arrays["category_codes"],
            categories=text["categories"],
            brand_codes=arrays["brand_codes"],
            brands=text["brands"],
            price_cents=arrays["price_cents"],
            in_stock=arrays["in_stock"],
            descriptions=text.get("descriptions") or [],
            # builds before colours have neither column: every item's colour is unknown
            color_codes=arrays["color_codes"] if "color_codes" in arrays.files else [],
            colors=text.get("colors", []) if "color_codes" in arrays.files else [],
        )

    @classmethod
    def from_columns(
        cls,
        item_ids: Sequence[int],
        titles: Sequence[str],
        categories: Sequence[str] | None = None,
        brands: Sequence[str] | None = None,
        price_cents: Sequence[int] | None = None,
        in_stock: Sequence[bool] | None = None,
        descriptions: Sequence[str] | None = None,
        colors: Sequence[str] | None = None,
    ) -> Catalog:
        n = len(item_ids)
        cat_vocab, cat_codes = _encode(categories or [UNKNOWN] * n)
        brand_vocab, brand_codes = _encode(brands or [UNKNOWN] * n)
        color_vocab, color_codes = _encode(colors or [UNKNOWN] * n)
        return cls(
            item_ids=np.asarray(item_ids, dtype=np.int64),
            titles=list(titles),
            category_codes=cat_codes,
            categories=cat_vocab,
            brand_codes=brand_codes,
            brands=brand_vocab,
            price_cents=np.asarray(
                price_cents if price_cents is not None else [0] * n, dtype=np.int64
            ),
            in_stock=np.asarray(in_stock if in_stock is not None else [True] * n, dtype=bool),
            descriptions=list(descriptions) if descriptions else [],
            color_codes=color_codes,
            colors=color_vocab,
        )


def _word_index(titles: Sequence[str]) -> dict[str, np.ndarray]:
    """Each title word's rows, sorted."""
    vocab: dict[str, int] = {}
    word_ids: list[int] = []
    rows: list[int] = []
    for row, title in enumerate(titles):
        for w in set(words(title)):
            word_ids.append(vocab.setdefault(w, len(vocab)))
            rows.append(row)
    ids, at = np.asarray(word_ids, np.int64), np.asarray(rows, np.int64)
    order = np.lexsort((at, ids))
    ids, at = ids[order], at[order]
    bounds = np.searchsorted(ids, np.arange(len(vocab) + 1))
    return {w: at[bounds[i] : bounds[i + 1]] for w, i in vocab.items()}


def _encode(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    vocab: dict[str, int] = {}
    codes = np.fromiter(
        (vocab.setdefault(v or UNKNOWN, len(vocab)) for v in values),
        dtype=np.int32,
        count=len(values),
    )
    return list(vocab), codes


class RowIndex:
    """Item id -> row lookups over an id column (unique ids)."""

    def __init__(self, item_ids: np.ndarray) -> None:
        ids = np.asarray(item_ids, dtype=np.int64)
        n = len(ids)
        self._id_order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._id_order]
        if n > 1 and bool((self._sorted_ids[1:] == self._sorted_ids[:-1]).any()):
            raise ValueError("catalog item ids are not unique")
        # ids are usually compact: then a table indexed by id answers rows() without a search
        self._dense_rows: np.ndarray | None = None
        if n and self._sorted_ids[0] >= 0 and self._sorted_ids[-1] < 4 * n + 1024:
            self._dense_rows = np.full(int(self._sorted_ids[-1]) + 1, -1, dtype=np.int64)
            self._dense_rows[ids] = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._sorted_ids)

    def rows(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the given ids; -1 for ids not in the column."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if len(self._sorted_ids) == 0 or len(ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self._dense_rows is not None:
            table = self._dense_rows
            if ids.min() >= 0 and ids.max() < len(table):  # the usual case: one gather
                return table[ids]
            inside = (ids >= 0) & (ids < len(table))
            return np.where(inside, table[np.where(inside, ids, 0)], -1)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._id_order[pos], -1).astype(np.int64)

    def row(self, item_id: int) -> int:
        return int(self.rows(np.array([item_id], dtype=np.int64))[0])
