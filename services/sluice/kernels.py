"""Compiled kernels for the per-request steps that numpy cannot do without temporaries.

Each kernel replaces a few numpy calls that gathered rows into a new array, or scanned the
whole catalog, only to reduce the result right away (issue 12: the cost per request). They are
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
from pathlib import Path

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
def _rows_dot(table: np.ndarray, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    n, m = len(rows), vectors.shape[0]
    out = np.empty((n, m), np.float32)
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= table.shape[0]:
            raise IndexError("row out of range")
        row = table[r]
        for j in range(m):
            v = vectors[j]
            acc = np.float32(0.0)
            for k in range(len(row)):
                acc += row[k] * v[k]
            out[i, j] = acc
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
def _top_positive(scores: np.ndarray, k: int) -> np.ndarray:
    hits = np.empty(len(scores), np.int64)
    m = 0
    for i in range(len(scores)):  # without a branch, which would be hard to predict
        hits[m] = i
        m += scores[i] > 0
    hits = hits[:m]
    if m > k:
        values = scores[hits]
        kth = np.partition(values, m - k)[m - k]
        above = 0
        for j in range(m):
            above += values[j] > kth
        tied = k - above  # the first tied rows in row order fill the cut
        kept = np.empty(k, np.int64)
        c = 0
        for j in range(m):
            if values[j] > kth or (values[j] == kth and tied > 0):
                if values[j] == kth:
                    tied -= 1
                kept[c] = hits[j]
                c += 1
        hits = kept
    order = np.argsort(-scores[hits], kind="mergesort")  # stable: equal scores in row order
    return hits[order]


def top_positive(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` best positive scores, best first; equal scores in row order, also
    at the cut. One pass over the scores instead of numpy's scan, partition and sort of
    temporaries."""
    if k <= 0:
        return np.zeros(0, np.int64)
    return _top_positive(np.ascontiguousarray(scores, np.float32), int(k))
