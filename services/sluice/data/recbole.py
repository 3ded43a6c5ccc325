"""Datasets in the UniSRec/RecBole layout (the one of ``../shared/data/amazon-scientific``).

A directory holds one file prefix ``P`` (``Scientific`` there), discovered from
the directory: the single ``P.text`` file with a ``P.test.inter`` next to it.

* ``P.text`` — tab-separated with a header ``item_id:token`` (the raw item id,
  an ASIN) and ``text:token_seq`` ("title. categories. brand.").
* ``P.item2index`` / ``P.user2index`` — no header; raw id and integer index.
* ``P.train.inter`` / ``P.valid.inter`` / ``P.test.inter`` — tab-separated with
  a header ``user_id:token``, ``item_id_list:token_seq`` (space separated item
  indexes) and ``item_id:token`` (the target); user and item columns are the
  integer indexes. Histories are truncated to 50 items, order is chronological.

The catalog's item ids are the integer indexes of ``P.item2index`` and each
title is the whole text field. The brand is the text's last ". "-separated field
(:func:`text_brand`); the other attributes keep the catalog's defaults. A user's
sequence is the test row's history followed by its target (its validation row
must end where the test history does). The layout has **no timestamps**: each
user's interactions get ``0, 1, 2, ...`` in their order. Users are the raw ids
of ``P.user2index``, in index order.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sluice.data.catalog import Catalog
from sluice.data.interactions import Interactions


def _prefix(directory: Path) -> str | None:
    """The file prefix ``P`` of the single ``P.text`` with a ``P.test.inter``, else None."""
    texts = sorted(directory.glob("*.text"))
    if len(texts) != 1:
        return None
    prefix = texts[0].name[: -len(".text")]
    return prefix if (directory / f"{prefix}.test.inter").exists() else None


def is_recbole(directory: Path) -> bool:
    """A UniSRec/RecBole dataset: one ``*.text`` file and its ``*.test.inter``."""
    return directory.is_dir() and _prefix(directory) is not None


def _path(directory: Path, suffix: str) -> Path:
    prefix = _prefix(directory)
    if prefix is None:
        raise ValueError(
            f"{directory} is not in the RecBole layout (one *.text file and its *.test.inter)"
        )
    return directory / f"{prefix}{suffix}"


def _read_index(path: Path) -> dict[str, int]:
    """``raw id <TAB> index`` lines (no header) as a mapping."""
    index: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        for rec in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if rec:
                index[rec[0]] = int(rec[1])
    if len(set(index.values())) != len(index):
        raise ValueError(f"{path}: indexes are not unique")
    return index


def text_brand(text: str) -> str:
    """The brand of a "title. categories. brand." text: its last field ("" with fewer than
    three fields, as the brand may then be missing)."""
    fields = text.strip().rstrip(".").split(". ")
    return fields[-1].strip() if len(fields) >= 3 else ""


def load_recbole_catalog(directory: Path) -> Catalog:
    """Items of ``P.item2index`` (in index order) with the text of ``P.text`` as title."""
    index = _read_index(_path(directory, ".item2index"))
    text_path = _path(directory, ".text")
    texts: dict[str, str] = {}
    with open(text_path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        ii, it = header.index("item_id:token"), header.index("text:token_seq")
        for rec in reader:
            if rec:
                texts[rec[ii]] = " ".join(rec[it].split()) if len(rec) > it else ""
    raw = sorted(index, key=index.__getitem__)
    titles = [texts.get(r, "") for r in raw]
    return Catalog.from_columns(
        [index[r] for r in raw], titles, brands=[text_brand(t) for t in titles]
    )


def _read_inter(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Users, history strings and targets of an ``.inter`` file."""
    users: list[int] = []
    histories: list[str] = []
    targets: list[int] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        iu = header.index("user_id:token")
        ih = header.index("item_id_list:token_seq")
        it = header.index("item_id:token")
        for rec in reader:
            if rec:
                users.append(int(rec[iu]))
                histories.append(rec[ih])
                targets.append(int(rec[it]))
    return np.asarray(users, np.int64), histories, np.asarray(targets, np.int64)


def load_recbole_interactions(directory: Path, catalog: Catalog) -> Interactions:
    """Each user's sequence: the test row's history followed by its target.

    Raises ValueError when a validation row's target is not the last item of the
    same user's test history. Timestamps are synthesized (``0, 1, ...`` per user).
    Items missing from ``catalog`` are dropped, as :func:`load_interactions` does.
    """
    user_index = _read_index(_path(directory, ".user2index"))
    user_ids = sorted(user_index, key=user_index.__getitem__)
    num_users = len(user_ids)
    if sorted(user_index.values()) != list(range(num_users)):
        raise ValueError(f"{_path(directory, '.user2index')}: indexes are not 0..{num_users - 1}")

    test_path = _path(directory, ".test.inter")
    users, histories, targets = _read_inter(test_path)
    if len(np.unique(users)) != len(users):
        raise ValueError(f"{test_path}: more than one test row for a user")
    if len(users) and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"{test_path}: user index outside {_path(directory, '.user2index')}")
    lengths = np.fromiter((len(h.split()) for h in histories), np.int64, len(histories)) + 1
    items = np.fromiter(
        (int(i) for h, t in zip(histories, targets.tolist(), strict=True) for i in (*h.split(), t)),
        np.int64,
        int(lengths.sum()),
    )
    ends = np.cumsum(lengths)  # one past each row's target

    valid_path = _path(directory, ".valid.inter")
    if valid_path.exists():
        v_users, _, v_targets = _read_inter(valid_path)
        row_of = np.full(num_users, -1, np.int64)
        row_of[users] = np.arange(len(users))
        rows = row_of[v_users] if len(v_users) else np.zeros(0, np.int64)
        if (rows < 0).any():
            u = int(v_users[np.flatnonzero(rows < 0)[0]])
            raise ValueError(f"{valid_path}: user {u} has a validation row but no test row")
        # the test history's last item sits just before the test target
        has_history = lengths[rows] >= 2
        last = np.where(has_history, items[np.maximum(ends[rows] - 2, 0)], -1)
        bad = np.flatnonzero(last != v_targets)
        if len(bad):
            b = int(bad[0])
            raise ValueError(
                f"{valid_path}: user {int(v_users[b])}'s validation target {int(v_targets[b])} "
                f"is not the last item of their test history ({int(last[b])}); "
                f"{len(bad)} such rows"
            )

    # rows grouped by user index, each row's items in order
    order = np.argsort(users, kind="stable")
    sizes = lengths[order]
    row_users = np.repeat(users[order], sizes)
    position = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    take = position + np.repeat((ends - lengths)[order], sizes)
    item_rows = catalog.rows(items[take])
    known = item_rows >= 0
    return Interactions(
        user_ids=user_ids,
        user_index=row_users.astype(np.int32)[known],
        item_rows=item_rows[known],
        timestamps=position.astype(np.int64)[known],
    )
