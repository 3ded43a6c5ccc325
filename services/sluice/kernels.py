"""Compiled kernels for the per-request steps that numpy cannot do without temporaries.

Each kernel replaces numpy calls that gathered rows into a new array, allocated or scanned
something the catalog's size, only to reduce the result right away, or ran once per step of a
Python loop (issue 12: the cost per request). They are
compiled by numba on first use (a few seconds, once per machine), release the GIL, and are
cached on disk under ``$NUMBA_CACHE_DIR``. That defaults here to ``<tmp>/sluice-numba-<uid>``:
our containers have a read-only root and a writable ``/tmp``. A process loads them from the
cache in under half a second, while it warms up and before its health check says SERVING.

``tests/stages/test_vectorized.py`` holds each kernel to the numpy expression it replaced.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

# before numba reads its configuration: a cache it can write in a read-only container, one
# per user so that two users of a machine do not share a folder only one of them can write
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"sluice-numba-{os.getuid()}")
)

import numba

_jit = numba.njit(cache=True, nogil=True)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dot(x: np.ndarray, y: np.ndarray) -> np.float32:
    """A float32 product of two rows, summed in whatever order vectorizes."""
    acc = np.float32(0.0)
    for k in range(len(x)):
        acc += x[k] * y[k]
    return acc


@numba.njit(cache=True, nogil=True, fastmath=True)
def _rows_dot(table: np.ndarray, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    n, m = len(rows), vectors.shape[0]
    out = np.empty((n, m), np.float32)
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= table.shape[0]:
            raise IndexError("row out of range")
        row = table[r]
        for j in range(m):
            out[i, j] = _dot(row, vectors[j])
    return out


def rows_dot(table: np.ndarray, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``table[rows] @ vectors.T`` as float32 [len(rows), len(vectors)], without the gather.

    A random gather of 1,000 rows of 384 floats writes 1.5 MiB only for a product to read it
    again; here each row is read once, straight from the table. The sums are in another
    order than BLAS's, so the results differ from numpy's in the last bits (the test allows
    1e-5 relative). A table that is not C-ordered float32 takes numpy's path: converting it
    would copy the whole table per call."""
    vectors = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
    if table.ndim != 2 or vectors.shape[1] != table.shape[1]:
        raise ValueError(f"vectors of width {vectors.shape[1]} for a table of {table.shape}")
    if table.dtype != np.float32 or not table.flags.c_contiguous:
        return np.asarray(table[rows] @ vectors.T, np.float32)
    return _rows_dot(table, np.ascontiguousarray(rows, np.int64), vectors)


@_jit
def _weighted_row_sum(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    seeds: np.ndarray,
    weights: np.ndarray,
    columns: np.ndarray,
    scratch: np.ndarray,
) -> np.ndarray:
    for j in range(len(seeds)):
        w = weights[j]
        for e in range(indptr[seeds[j]], indptr[seeds[j] + 1]):
            scratch[indices[e]] += np.float64(data[e] * w)
    out = np.empty(len(columns), np.float32)
    for i in range(len(columns)):
        out[i] = np.float32(scratch[columns[i]])
    for j in range(len(seeds)):  # leave the scratch zeroed for the next call
        for e in range(indptr[seeds[j]], indptr[seeds[j] + 1]):
            scratch[indices[e]] = 0.0
    return out


_scratch = threading.local()


def weighted_row_sum(
    matrix: sparse.csr_matrix, seeds: np.ndarray, weights: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """``(weights @ matrix[seeds])[columns]`` as float32, reading only the seeds' stored entries.

    The seeds' entries are added into a zeroed float64 row the size of the matrix's width
    (one per thread, kept between calls), the columns are read from it, and the touched
    entries are zeroed again. Each product is taken in the matrix's own dtype (float32
    served, float64 in the build's fitting view, never a copy of the matrix), and the sums
    are float64 in the order of the entries, as ``np.bincount`` added them before, so the
    result is the same to the bit."""
    seeds = np.asarray(seeds, np.int64)
    columns = np.asarray(columns, np.int64)
    width = matrix.shape[1]
    # checked here, not in the kernel: a bad index there would leave the scratch row dirty
    if len(seeds) and (seeds.min() < 0 or seeds.max() >= matrix.shape[0]):
        raise IndexError("seed row out of range")
    if len(columns) and (columns.min() < 0 or columns.max() >= width):
        raise IndexError("column out of range")
    scratch = getattr(_scratch, "row", None)
    if scratch is None or len(scratch) < width:
        scratch = _scratch.row = np.zeros(width, np.float64)
    return _weighted_row_sum(
        matrix.indptr,
        matrix.indices,
        matrix.data,
        seeds,
        np.asarray(weights, np.float32),
        columns,
        scratch,
    )


@_jit
def _top_hits(hits: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best of the distinct rows ``hits`` (in any order) by
    ``values``, best first; equal values in row order, also at the cut."""
    m = len(hits)
    keep = np.arange(m)
    if m > k:
        kth = np.partition(values, m - k)[m - k]
        above = np.nonzero(values > kth)[0]
        tied = np.nonzero(values == kth)[0]  # the first tied rows fill the cut
        tied = tied[np.argsort(hits[tied], kind="mergesort")][: k - len(above)]
        keep = np.concatenate((above, tied))
    by_row = keep[np.argsort(hits[keep], kind="mergesort")]
    return by_row[np.argsort(-values[by_row], kind="mergesort")]  # stable: ties in row order


@_jit
def _postings_add(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    terms: np.ndarray,
    extra_rows: np.ndarray,
    extra_values: np.ndarray,
    scratch: np.ndarray,
) -> np.ndarray:
    """Adds the terms' postings, then the extra entries, into ``scratch``; the rows touched,
    once per posting of each distinct term and per extra entry (the callers read them and
    zero them again). A term the query repeats is added again, as bm25s does, but not
    listed again: a query that repeats a common word lists no more than the index holds."""
    entries = len(extra_rows)
    first = np.ones(len(terms), np.bool_)
    for i in range(len(terms)):
        for j in range(i):
            if terms[j] == terms[i]:
                first[i] = False
                break
        if first[i]:
            entries += indptr[terms[i] + 1] - indptr[terms[i]]
    touched = np.empty(entries, np.int64)
    m = 0
    for i in range(len(terms)):  # term by term, in the order bm25s adds them
        t = terms[i]
        if first[i]:
            for e in range(indptr[t], indptr[t + 1]):
                scratch[indices[e]] += data[e]
                touched[m] = indices[e]
                m += 1
        else:
            for e in range(indptr[t], indptr[t + 1]):
                scratch[indices[e]] += data[e]
    for j in range(len(extra_rows)):
        scratch[extra_rows[j]] += extra_values[j]
        touched[m] = extra_rows[j]
        m += 1
    return touched


@_jit
def _postings_at(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    terms: np.ndarray,
    extra_rows: np.ndarray,
    extra_values: np.ndarray,
    rows: np.ndarray,
    scratch: np.ndarray,
) -> tuple[np.ndarray, np.float32]:
    touched = _postings_add(indptr, indices, data, terms, extra_rows, extra_values, scratch)
    out = np.empty(len(rows), np.float32)
    for i in range(len(rows)):
        out[i] = scratch[rows[i]]
    top = np.float32(0.0)  # the rows no posting reaches score 0
    for r in touched:  # the best sum, and the scratch zeroed again for the next call
        top = max(top, scratch[r])
        scratch[r] = 0.0
    return out, top


@_jit
def _postings_top(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    terms: np.ndarray,
    extra_rows: np.ndarray,
    extra_values: np.ndarray,
    allowed: np.ndarray,
    k: int,
    scratch: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    touched = _postings_add(indptr, indices, data, terms, extra_rows, extra_values, scratch)
    hits = np.empty(len(touched), np.int64)
    values = np.empty(len(touched), np.float32)
    masked = len(allowed) > 0
    m = 0
    for r in touched:  # each row once: its sum is zeroed as it is read
        v = scratch[r]
        scratch[r] = 0.0
        if v > 0 and (not masked or allowed[r]):
            hits[m], values[m] = r, v
            m += 1
    best = _top_hits(hits[:m], values[:m], k)
    return hits[best], values[best]


@_jit
def _mmr_order(
    relevance: np.ndarray,
    table: np.ndarray,
    rows: np.ndarray,
    brands: np.ndarray,
    cap: int,
    lam: float,
    target: int,
    tail: np.ndarray,
    minimums: np.ndarray,
) -> np.ndarray:
    limit = len(rows)
    chosen = np.empty(target, np.int64)
    bias = np.zeros(limit)  # -10 per capped brand, -inf once chosen
    max_sim = np.zeros(limit, np.float32)  # to the closest chosen item
    weight = np.float32(1.0 - lam)
    tail_count = 0
    for step in range(target):
        restrict = False
        if len(minimums) and tail_count < minimums[step + 1]:
            for j in range(limit):  # the prefix needs a tail item, if one is left
                if tail[j] and bias[j] != -np.inf:
                    restrict = True
                    break
        pick = -1
        best = 0.0
        for j in range(limit):  # np.argmax: the first maximum, or the first NaN
            if restrict and not tail[j]:
                value = -np.inf
            else:
                value = relevance[j] - np.float64(weight * max_sim[j]) + bias[j]
            if np.isnan(value):
                pick = j
                break
            if pick < 0 or value > best:
                pick, best = j, value
        chosen[step] = pick
        bias[pick] = -np.inf
        brand, count = brands[pick], 0
        for i in range(step + 1):
            count += brands[chosen[i]] == brand
        if cap and count == cap:  # the brand's items go last, not away
            for j in range(limit):
                if brands[j] == brand:
                    bias[j] -= 10.0
        if len(tail):
            tail_count += tail[pick]
        if lam < 1.0:  # at 1.0 similarity has no weight (search pages, by default)
            for j in range(limit):
                s = _dot(table[rows[j]], table[rows[pick]])
                if step == 0 or np.isnan(s) or s > max_sim[j]:  # np.maximum: NaN stays
                    max_sim[j] = s
    return chosen


def mmr_order(
    relevance: np.ndarray,
    table: np.ndarray,
    rows: np.ndarray,
    brands: np.ndarray,
    *,
    lam: float,
    cap: int,
    target: int,
    tail: np.ndarray | None = None,
    minimums: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy maximal marginal relevance: the positions of the first ``target`` picks.

    Each step picks the candidate with the highest ``relevance - (1 - lam) * (similarity to
    the closest chosen candidate, 0 before the first pick)``, where similarity is the
    product of the candidates' rows of ``table``; a brand that has ``cap`` picks has its
    candidates 10 lower (0: no cap). While ``tail_count < minimums[len(chosen) + 1]`` (an
    exposure target; :func:`sluice.rerank.exposure.fair_minimums`), only ``tail``
    candidates can be picked, if any is left. Ties go to the first candidate, as
    ``np.argmax`` gives them. One call instead of about ten numpy calls per step, and only
    the picked rows' products are taken, straight from the table."""
    rows = np.ascontiguousarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(table)):
        raise IndexError("row out of range")
    if table.dtype != np.float32 or not table.flags.c_contiguous:
        table, rows = np.ascontiguousarray(table[rows], np.float32), np.arange(len(rows))
    target = max(0, min(int(target), len(rows)))
    if minimums is not None and tail is not None:
        if len(minimums) <= target or len(tail) != len(rows):
            raise ValueError(
                "an exposure target needs a minimum per prefix and a tail flag per row"
            )
        tail_flags, minimum = np.ascontiguousarray(tail, np.bool_), np.asarray(minimums, np.int64)
    else:
        tail_flags, minimum = np.zeros(0, np.bool_), np.zeros(0, np.int64)
    return _mmr_order(
        np.ascontiguousarray(relevance, np.float64),
        table,
        rows,
        np.ascontiguousarray(brands, np.int64),
        int(cap),
        float(lam),
        target,
        tail_flags,
        minimum,
    )


@_jit
def _merge(
    rows: np.ndarray,
    offsets: np.ndarray,
    takes: np.ndarray,
    codes: np.ndarray,
    rrf_order: np.ndarray,
    budget: int,
    rrf_k: float,
    taken: np.ndarray,
    position: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_lists = len(offsets) - 1
    picked = np.empty(len(rows), np.int64)
    picked_code = np.empty(len(rows), np.int8)
    fresh = np.empty(len(rows), np.int64)  # each list's rows not taken before it, in place
    left_end = np.empty(n_lists, np.int64)
    left_start = np.empty(n_lists, np.int64)
    n = count = 0
    for s in range(n_lists):  # each list fills its quota from the rows still free
        m = offsets[s]
        for i in range(offsets[s], offsets[s + 1]):
            if not taken[rows[i]]:
                fresh[m] = rows[i]
                m += 1
        take = min(takes[s], budget - count, m - offsets[s])
        for j in range(offsets[s], offsets[s] + take):
            picked[n] = fresh[j]
            picked_code[n] = codes[s]
            n += 1
            if not taken[fresh[j]]:
                taken[fresh[j]] = True
                count += 1
        left_start[s], left_end[s] = offsets[s] + take, m
    room = budget - count
    step = 0
    while room > 0 and step < len(rows):  # the leftovers round-robin: each list's step-th
        for s in range(n_lists):
            j = left_start[s] + step
            if room > 0 and j < left_end[s] and not taken[fresh[j]]:
                taken[fresh[j]] = True
                picked[n] = fresh[j]
                picked_code[n] = codes[s]
                n += 1
                room -= 1
        step += 1
    for j in range(n):
        position[picked[j]] = j
    fused = np.zeros(n)  # reciprocal-rank fusion over every list that found the row
    for s in rrf_order:
        for i in range(offsets[s], offsets[s + 1]):
            p = position[rows[i]]
            if p >= 0:
                fused[p] += 1.0 / (rrf_k + (i - offsets[s]))
    for j in range(n):  # leave the scratch rows as they were
        taken[picked[j]] = False
        position[picked[j]] = -1
    return picked[:n], picked_code[:n], fused


def merge_lists(
    lists: list[np.ndarray],
    takes: list[int],
    codes: list[int],
    rrf_order: list[int],
    budget: int,
    rrf_k: float,
    n_rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recall's merge in one pass (:func:`sluice.recall.sources.merge` has the rules): the
    picked rows, their lists' codes and their fused scores, in picking order.

    ``lists`` are rows below ``n_rows``, in quota order; list ``s`` takes up to ``takes[s]``
    rows still free, then the leftovers go round-robin; the fusion adds ``1 / (rrf_k +
    rank)`` over the lists in ``rrf_order``, in that order, as numpy's ``add.at`` did, so
    the scores are the same to the bit. Two per-thread scratch rows the catalog's size,
    kept between calls, stand for the ``taken`` mask and the row-to-place map that were
    allocated per request before."""
    offsets = np.zeros(len(lists) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in lists])
    rows = np.concatenate(lists).astype(np.int64, copy=False) if lists else offsets[:0]
    # checked here, not in the kernel: a bad row there would leave the scratch dirty
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError("row out of range")
    if any(t < 0 for t in takes):
        raise ValueError("a list's quota is negative")
    scratch = getattr(_scratch, "merge", None)
    if scratch is None or len(scratch[0]) < n_rows:
        scratch = _scratch.merge = (np.zeros(n_rows, np.bool_), np.full(n_rows, -1, np.int64))
    return _merge(
        rows,
        offsets,
        np.asarray(takes, np.int64),
        np.asarray(codes, np.int8),
        np.asarray(rrf_order, np.int64),
        int(budget),
        float(rrf_k),
        *scratch,
    )


# a term-by-row sparse matrix in CSR form (bm25s's precomputed scores): indptr, rows, values
Postings = tuple[np.ndarray, np.ndarray, np.ndarray]


def _postings_args(
    postings: Postings,
    terms: Sequence[int],
    extra: tuple[np.ndarray, np.ndarray] | None,
    n_rows: int,
) -> tuple[Any, ...]:
    """The kernels' arguments, checked here, not in the kernel: a bad row there would
    leave the per-thread scratch row dirty. ``postings``' own rows are the index's and
    below ``n_rows`` by construction."""
    indptr, indices, data = postings
    term_ids = np.asarray(terms, np.int64)
    if len(term_ids) and (term_ids.min() < 0 or term_ids.max() >= len(indptr) - 1):
        raise IndexError("term out of range")
    if extra is None:
        extra_rows, extra_values = np.zeros(0, np.int64), np.zeros(0, np.float32)
    else:
        extra_rows = np.asarray(extra[0], np.int64)
        extra_values = np.asarray(extra[1], np.float32)
        if len(extra_rows) != len(extra_values):
            raise ValueError("extra rows and values differ in length")
        if len(extra_rows) and (extra_rows.min() < 0 or extra_rows.max() >= n_rows):
            raise IndexError("extra row out of range")
    scratch = getattr(_scratch, "postings", None)
    if scratch is None or len(scratch) < n_rows:
        scratch = _scratch.postings = np.zeros(n_rows, np.float32)
    return indptr, indices, data, term_ids, extra_rows, extra_values, scratch


def postings_at(
    postings: Postings,
    terms: Sequence[int],
    rows: np.ndarray,
    n_rows: int,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, float]:
    """The sums over ``terms``' postings of ``rows`` (float32), and the best sum of any of
    the ``n_rows`` rows (0 when none is positive).

    What ``bm25s`` computes, and the ``scores[rows]``, ``scores.max()`` a caller reads from
    it, without the catalog-sized array: the postings are added term by term, in the order
    ``bm25s`` adds them (float32), into a zeroed row kept per thread, then ``extra`` (rows,
    values: the documents of items added after the build), so the sums are the same to the
    bit. Only the touched entries are read for the best sum and zeroed again: the cost is
    the postings' length, not the catalog's."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError("row out of range")
    indptr, indices, data, term_ids, extra_rows, extra_values, scratch = _postings_args(
        postings, terms, extra, n_rows
    )
    out, top = _postings_at(
        indptr, indices, data, term_ids, extra_rows, extra_values, rows, scratch
    )
    return out, float(top)


def postings_top(
    postings: Postings,
    terms: Sequence[int],
    k: int,
    n_rows: int,
    allowed: np.ndarray | None = None,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows with the best positive sums over ``terms``' postings (and ``extra``, as
    in :func:`postings_at`) among those ``allowed`` lets through (every row when None), best
    first, equal sums in row order, also at the cut; and their sums.

    The same rows as a scan of every row's score for the positive ones, a partition and a
    sort, but only the touched rows are visited."""
    if allowed is not None and len(allowed) != n_rows:
        raise ValueError(f"a mask of {len(allowed)} rows for {n_rows}")
    args = _postings_args(postings, terms, extra, n_rows)
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    mask = np.zeros(0, np.bool_) if allowed is None else np.ascontiguousarray(allowed, np.bool_)
    indptr, indices, data, term_ids, extra_rows, extra_values, scratch = args
    return _postings_top(
        indptr, indices, data, term_ids, extra_rows, extra_values, mask, int(k), scratch
    )
