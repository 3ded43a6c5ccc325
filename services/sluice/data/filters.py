"""Attribute filters, validated against the catalog and compiled to a row mask."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sluice.core.errors import InvalidArgument
from sluice.data.catalog import (
    BOOL_ATTRIBUTES,
    FILTERABLE,
    NUMERIC_ATTRIBUTES,
    STRING_ATTRIBUTES,
    WORD_ATTRIBUTES,
    Catalog,
)

MAX_FILTERS = 64
MAX_FILTER_VALUES = 256
MAX_VALUE_CHARS = 256


@dataclass(frozen=True)
class AttributeFilter:
    """Keep items whose attribute ``field`` satisfies every given condition. A string
    attribute takes ``any_of`` (keep these values) or ``none_of`` (keep all but these)."""

    field: str
    any_of: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    equals: bool | None = None
    none_of: tuple[str, ...] = ()


@dataclass
class FilterSet:
    """Validated filters and the catalog rows they allow (None: all rows)."""

    filters: tuple[AttributeFilter, ...] = ()
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.mask is not None

    def allows_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.mask is None:
            return rows >= 0
        ok = rows >= 0
        out = np.zeros(len(rows), dtype=bool)
        out[ok] = self.mask[rows[ok]]
        return out


def validate(filters: Sequence[AttributeFilter], prefix: str = "filters") -> None:
    """Raise INVALID_ARGUMENT naming the offending field of a malformed filter."""
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"at most {MAX_FILTERS} filters", field_path=prefix)
    for i, f in enumerate(filters):
        where = f"{prefix}[{i}]"
        for name, values in (("any_of", f.any_of), ("none_of", f.none_of)):
            if len(values) > MAX_FILTER_VALUES or any(len(v) > MAX_VALUE_CHARS for v in values):
                raise InvalidArgument(
                    f"at most {MAX_FILTER_VALUES} values of at most {MAX_VALUE_CHARS} characters",
                    field_path=f"{where}.{name}",
                )
        for name, bound in (("min", f.min), ("max", f.max)):
            if bound is not None and not math.isfinite(bound):
                raise InvalidArgument("must be a finite number", field_path=f"{where}.{name}")
        if f.field not in FILTERABLE:
            raise InvalidArgument(
                f"unknown filter field {f.field!r}; known fields: {', '.join(FILTERABLE)}",
                field_path=f"{where}.field",
            )
        if f.field in WORD_ATTRIBUTES:
            if not f.any_of or f.none_of or f.min is not None or f.max is not None:
                raise InvalidArgument(
                    f"filter on {f.field!r} needs any_of words (and nothing else)",
                    field_path=f"{where}.any_of",
                )
            if f.equals is not None:
                raise InvalidArgument(f"{f.field!r} takes words: use any_of", field_path=where)
        elif f.field in STRING_ATTRIBUTES:
            if bool(f.any_of) == bool(f.none_of):
                raise InvalidArgument(
                    f"filter on {f.field!r} needs any_of or none_of values (one of them)",
                    field_path=f"{where}.any_of",
                )
            if f.min is not None or f.max is not None or f.equals is not None:
                raise InvalidArgument(
                    f"{f.field!r} is a string attribute: use any_of only", field_path=where
                )
        elif f.field in NUMERIC_ATTRIBUTES:
            if f.min is None and f.max is None:
                raise InvalidArgument(
                    f"filter on {f.field!r} needs min and/or max", field_path=f"{where}.min"
                )
            if f.min is not None and f.max is not None and f.min > f.max:
                raise InvalidArgument("min is above max", field_path=f"{where}.min")
            if f.any_of or f.none_of or f.equals is not None:
                raise InvalidArgument(f"{f.field!r} is numeric: use min/max only", field_path=where)
        elif f.field in BOOL_ATTRIBUTES and f.equals is None:
            raise InvalidArgument(
                f"filter on {f.field!r} needs equals", field_path=f"{where}.equals"
            )


def compile_filters(catalog: Catalog, filters: Sequence[AttributeFilter]) -> FilterSet:
    """Validate the filters and compute the mask of catalog rows they keep. Hidden rows
    (items deleted by a live update, room for new ones) are never kept."""
    validate(filters)
    if not filters:
        return FilterSet(mask=~catalog.hidden if catalog.deleted else None)
    mask = ~catalog.hidden
    for f in filters:
        if f.field in WORD_ATTRIBUTES:
            hit = np.zeros(len(catalog), dtype=bool)
            for value in f.any_of:
                hit[catalog.rows_with_words(value)] = True
            mask &= hit
        elif f.field in STRING_ATTRIBUTES:
            names, codes = catalog.values_of(f.field)
            values = f.any_of or f.none_of
            wanted = [names.index(v) for v in values if v in names]
            hit = np.isin(codes, wanted)
            mask &= hit if f.any_of else ~hit
        elif f.field == "price_cents":
            if f.min is not None:
                mask &= catalog.price_cents >= f.min
            if f.max is not None:
                mask &= catalog.price_cents <= f.max
        elif f.field == "in_stock":
            mask &= catalog.in_stock == bool(f.equals)
    return FilterSet(tuple(filters), mask)
