"""Approximate nearest-neighbour index for the recall service (faiss).

Vectors are L2-normalised embeddings searched by inner product (cosine). ``kind`` picks
the structure:

* ``flat``          exact brute force (inner-product ``IndexFlat``).
* ``ivf_flat``      inverted lists over uncompressed vectors (``IVF{nlist},Flat``).
* ``ivf_fp16``      inverted lists over half-precision vectors (``IVF{nlist},SQfp16``): half
  of flat's memory, and half the bytes a probe reads.
* ``ivf_sq8``       inverted lists over 8-bit scalar codes (``IVF{nlist},SQ8``): a quarter.
* ``hnsw``          HNSW graph over uncompressed vectors (``HNSW32,Flat``).
* ``ivf_pq_refine`` inverted lists over 4-bit fast-scan PQ codes, re-ranked with 6-bit scalar
  codes (``IVF{nlist},PQ{d/3}x4fs,Refine(SQ6)``): 0.24 of flat's memory at d=384.
* ``ivf_rabitq``    inverted lists over 6-bit extended-RaBitQ codes of the residuals
  (``IVF{nlist},RaBitQ6``): 0.21 of flat's memory at d=384.
* ``auto``          ``flat`` below :data:`AUTO_FLAT_MAX` vectors; ``ivf_fp16`` while the float32
  vectors take at most :data:`AUTO_IVF_FP16_MAX_BYTES`; else :data:`DEFAULT_LARGE_KIND`.

The choice and its measurements are in ``docs/benchmarks.md`` (``python -m sluice.bench.ann``).
Rows are the 0-based positions of the vectors passed to :func:`build_index`; mapping rows to
item ids is the caller's job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

AUTO_FLAT_MAX = 50_000
"""Below this many vectors ``kind="auto"`` builds exact flat search."""

AUTO_IVF_FP16_MAX_BYTES = 192 * 2**20
"""Above ``AUTO_FLAT_MAX``, ``kind="auto"`` builds IVF over half-precision vectors while the
float32 vectors take at most this much, and RaBitQ beyond. Scanning the same lists, IVF-Flat
cost half to two thirds of RaBitQ's CPU per query at equal recall (at 100k items, top 1,000:
0.33 against 0.67 ms at 64-d, 0.81 against 1.41 ms at 384-d; ``hotpath ann``) for about 4.7
times its memory. Half-precision lists keep IVF-Flat's recall@1000 to three decimals for half
its memory, and a probe reads half the bytes: 0.59 against 0.76 ms at 384-d, 0.37 against
0.39 ms at 64-d. 100k x 384-d (147 MiB as float32, 76 MiB as fp16) takes ``ivf_fp16``;
1M x 64-d (244 MiB) and anything larger keep RaBitQ (docs/benchmarks.md)."""

DEFAULT_LARGE_KIND = "ivf_rabitq"
KINDS = ("flat", "ivf_flat", "ivf_fp16", "ivf_sq8", "hnsw", "ivf_pq_refine", "ivf_rabitq")

DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 128
DEFAULT_K_FACTOR = 16
SCAN_TARGET = {
    "ivf_flat": 8192,
    "ivf_fp16": 8192,
    "ivf_sq8": 8192,
    "ivf_rabitq": 8192,
    "ivf_pq_refine": 32768,
}
"""Vectors scanned per query by default (nprobe ~ target / mean list length): recall@100
reached 0.95 at ~4k scanned vectors for IVF-Flat at both 100k and 1M on the benchmark data."""
TRAIN_POINTS_PER_LIST = 40
"""k-means training sample per inverted list (faiss warns below 39)."""

EXHAUSTIVE_BELOW = 0.01
"""Filtered searches allowing fewer than this fraction of rows scan the allowed rows directly."""

_faiss: Any = faiss  # faiss 1.15's bundled stubs lack some classes (SearchParametersHNSW)

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(frozen=True)
class SearchParams:
    """Search-time knobs; ``None`` leaves the index's current value."""

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4*sqrt(n), >= 39 points each."""
    if n <= 0:
        return 1
    target = 2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(n))))
    cap = max(1, n // TRAIN_POINTS_PER_LIST)
    cap = 2 ** int(math.log2(cap))
    return int(max(1, min(target, cap)))


def default_nprobe(nlist: int, n: int, kind: str) -> int:
    """Lists probed per query so that about ``SCAN_TARGET[kind]`` vectors are scanned."""
    target = SCAN_TARGET.get(kind, 8192)
    return int(max(1, min(nlist, math.ceil(target * nlist / max(1, n)))))


def default_pq_m(d: int) -> int:
    """4-bit PQ sub-quantizers: about 3 dims each (128 for d=384), a divisor of ``d``."""
    for m in range(max(1, d // 3), 0, -1):
        if d % m == 0:
            return m
    return 1


def factory_string(
    kind: str,
    n: int,
    d: int,
    *,
    nlist: int | None = None,
    hnsw_m: int = DEFAULT_HNSW_M,
    pq_m: int | None = None,
) -> str:
    """The ``faiss.index_factory`` description of ``kind`` for ``n`` vectors of dim ``d``."""
    if kind == "auto":
        kind = resolve_kind("auto", n, d)
    nl = nlist or default_nlist(n)
    if kind == "flat":
        return "Flat"
    if kind == "ivf_flat":
        return f"IVF{nl},Flat"
    if kind == "ivf_fp16":
        return f"IVF{nl},SQfp16"
    if kind == "ivf_sq8":
        return f"IVF{nl},SQ8"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if kind == "ivf_rabitq":
        return f"IVF{nl},RaBitQ6"
    if kind == "ivf_pq_refine":
        return f"IVF{nl},PQ{pq_m or default_pq_m(d)}x4fs,Refine(SQ6)"
    raise ValueError(f"unknown index kind {kind!r}; expected 'auto' or one of {KINDS}")


def resolve_kind(kind: str, n: int, d: int) -> str:
    """Map ``auto`` to a concrete kind for ``n`` vectors of dimension ``d``."""
    if kind == "auto":
        if n < AUTO_FLAT_MAX:
            return "flat"
        if 4 * n * d <= AUTO_IVF_FP16_MAX_BYTES:
            return "ivf_fp16"
        return DEFAULT_LARGE_KIND
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected 'auto' or one of {KINDS}")
    return kind


def _as_matrix(x: np.ndarray, d: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (d is not None and x.shape[1] != d):
        raise ValueError(f"expected a float32 matrix [n, {d or 'd'}], got shape {x.shape}")
    return x


def build_index(
    vectors: np.ndarray,
    kind: str = "auto",
    metric: str = "ip",
    *,
    nlist: int | None = None,
    hnsw_m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    pq_m: int | None = None,
    train_size: int | None = None,
    seed: int = 1234,
) -> faiss.Index:
    """Train and fill a CPU faiss index of ``kind`` over ``vectors`` [n, d] (row i = vector i).

    IVF quantizers train on a random sample of ``train_size`` vectors (default 40 per list).
    Default search parameters (:func:`default_nprobe`, :data:`DEFAULT_EF_SEARCH`,
    :data:`DEFAULT_K_FACTOR`) are set on the returned index and persist through save/load.
    """
    x = _as_matrix(vectors)
    n, d = x.shape
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
    concrete = resolve_kind(kind, n, d)
    nl = nlist or default_nlist(n)
    desc = factory_string(concrete, n, d, nlist=nl, hnsw_m=hnsw_m, pq_m=pq_m)
    index = faiss.index_factory(d, desc, _METRICS[metric])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        m = min(n, train_size or TRAIN_POINTS_PER_LIST * nl)
        if m < n:
            rows = np.random.default_rng(seed).choice(n, size=m, replace=False)
            index.train(x[np.sort(rows)])
        else:
            index.train(x)
    index.add(x)
    _apply_params(
        index,
        SearchParams(
            nprobe=default_nprobe(nl, n, concrete) if ivf is not None else None,
            ef_search=DEFAULT_EF_SEARCH if hnsw is not None else None,
            k_factor=DEFAULT_K_FACTOR if isinstance(index, faiss.IndexRefine) else None,
        ),
    )
    log.info("built %s index (%s) over %d vectors of dim %d", concrete, desc, n, d)
    return index


def _hnsw(index: faiss.Index) -> Any:
    idx = faiss.downcast_index(index)
    return idx if isinstance(idx, faiss.IndexHNSW) else None


def _refine(index: faiss.Index) -> Any:
    idx = faiss.downcast_index(index)
    return idx if isinstance(idx, faiss.IndexRefine) else None


def _apply_params(index: faiss.Index, params: SearchParams) -> None:
    """Set search parameters as index attributes (serialised with the index)."""
    ivf = faiss.try_extract_index_ivf(index)
    if params.nprobe is not None:
        if ivf is None:
            raise ValueError("nprobe applies to IVF indexes only")
        ivf.nprobe = int(min(params.nprobe, ivf.nlist))
    if params.ef_search is not None:
        hnsw = _hnsw(index)
        if hnsw is None:
            raise ValueError("ef_search applies to HNSW indexes only")
        hnsw.hnsw.efSearch = int(params.ef_search)
    if params.k_factor is not None:
        refine = _refine(index)
        if refine is None:
            raise ValueError("k_factor applies to refined indexes only")
        refine.k_factor = float(params.k_factor)


def _kind_of(index: faiss.Index) -> str:
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):
        return "ivf_pq_refine"
    if isinstance(idx, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(idx, faiss.IndexIVFFlat):
        return "ivf_flat"
    if isinstance(idx, faiss.IndexIVFRaBitQ):
        return "ivf_rabitq"
    if isinstance(idx, faiss.IndexIVFScalarQuantizer):
        qtype = idx.sq.qtype
        if qtype == faiss.ScalarQuantizer.QT_fp16:
            return "ivf_fp16"
        if qtype == faiss.ScalarQuantizer.QT_8bit:
            return "ivf_sq8"
    if isinstance(idx, faiss.IndexFlat):
        return "flat"
    return type(idx).__name__


def _selector(mask: np.ndarray, count: int) -> tuple[Any, np.ndarray | None]:
    """A faiss selector over the rows ``mask`` allows (``count`` of them); the bitmap (if any)
    must outlive the selector."""
    if count * 256 < len(mask):  # a hash set is smaller than a bitmap of ntotal bits
        return faiss.IDSelectorBatch(np.flatnonzero(mask)), None
    bitmap = np.packbits(mask, bitorder="little")  # bit i of byte j is row 8j+i
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap


def _params(sel: Any) -> Any:
    """Search parameters with selector ``sel`` (faiss >= 1.15 keeps the reference)."""
    p = faiss.SearchParameters()
    p.sel = sel
    return p


def _ivf_params(sel: Any, nprobe: int) -> Any:
    p = faiss.SearchParametersIVF()
    p.sel = sel
    p.nprobe = int(nprobe)
    return p


def _refine_params(base: Any, k_factor: float) -> Any:
    """Refine-stage parameters over the base index's ``base`` parameters."""
    p = faiss.IndexRefineSearchParameters()
    p.k_factor = float(k_factor)
    p.base_index_params = base
    return p


class AnnIndex:
    """A faiss index over row-numbered vectors, on CPU or GPU.

    ``search`` is safe to call from several threads; ``set_search_params`` is not meant to race
    with searches (it changes index attributes).
    """

    def __init__(self, index: faiss.Index, *, gpu_index: faiss.Index | None = None) -> None:
        self._cpu = index
        self._gpu = gpu_index
        self.kind = _kind_of(index)

    @classmethod
    def build(
        cls, vectors: np.ndarray, kind: str = "auto", metric: str = "ip", **kw: Any
    ) -> AnnIndex:
        """Build with :func:`build_index` (CPU)."""
        return cls(build_index(vectors, kind, metric, **kw))

    # -- properties -------------------------------------------------------------------------
    @property
    def index(self) -> faiss.Index:
        """The index searched by :meth:`search` (the GPU copy when on GPU)."""
        return self._gpu if self._gpu is not None else self._cpu

    @property
    def cpu_index(self) -> faiss.Index:
        return self._cpu

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def d(self) -> int:
        return int(self._cpu.d)

    @property
    def nlist(self) -> int | None:
        ivf = faiss.try_extract_index_ivf(self._cpu)
        return None if ivf is None else int(ivf.nlist)

    def search_params(self) -> SearchParams:
        """The current default search parameters."""
        ivf = faiss.try_extract_index_ivf(self._cpu)
        hnsw = _hnsw(self._cpu)
        refine = _refine(self._cpu)
        return SearchParams(
            nprobe=None if ivf is None else int(ivf.nprobe),
            ef_search=None if hnsw is None else int(hnsw.hnsw.efSearch),
            k_factor=None if refine is None else int(refine.k_factor),
        )

    def set_search_params(
        self,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
    ) -> None:
        """Change nprobe (IVF), efSearch (HNSW) or the re-rank factor (refine) for later calls."""
        params = SearchParams(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
        _apply_params(self._cpu, params)
        if self._gpu is not None and nprobe is not None:
            faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", nprobe)

    def memory_bytes(self) -> int:
        """Serialised size of the index (about its resident size once read from disk)."""
        writer = faiss.VectorIOWriter()
        faiss.write_index(self._cpu, writer)
        return int(writer.data.size())

    # -- search -----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: (scores [q, k] float32, rows [q, k] int64, -1 if missing)."""
        q = _as_matrix(queries, self.d)
        if k <= 0:
            raise ValueError("k must be positive")
        scores, rows = self.index.search(q, k)
        return scores, rows

    def search_filtered(
        self, queries: np.ndarray, k: int, allowed_rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` among ``allowed_rows`` (row ids, or a bool mask over rows) only.

        The candidate budget (nprobe / efSearch) grows with the filter's selectivity, so a
        filter does not shrink the number of allowed candidates examined; small allowed sets
        are scanned directly. Every query gets ``min(k, number of allowed rows)`` results.
        Runs on the CPU index (GPU faiss ignores ID selectors).
        """
        q = _as_matrix(queries, self.d)
        if k <= 0:
            raise ValueError("k must be positive")
        allowed_rows = np.asarray(allowed_rows)
        if allowed_rows.dtype == np.bool_:  # a row mask: used as it is (no sort of ntotal ids)
            if allowed_rows.shape != (self.ntotal,):
                raise ValueError("a boolean allowed_rows mask must have ntotal entries")
            mask = allowed_rows
        else:
            rows_in = allowed_rows.astype(np.int64, copy=False).reshape(-1)
            if len(rows_in) and (rows_in.min() < 0 or rows_in.max() >= self.ntotal):
                raise ValueError("allowed_rows must be row numbers in [0, ntotal)")
            mask = np.zeros(self.ntotal, dtype=bool)
            mask[rows_in] = True
        count = int(np.count_nonzero(mask))
        nq = len(q)
        if count == 0 or nq == 0:
            return (
                np.full((nq, k), -np.inf, dtype=np.float32),
                np.full((nq, k), -1, dtype=np.int64),
            )
        sel, _bitmap = _selector(mask, count)
        frac = count / max(1, self.ntotal)
        want = min(k, count)
        if frac < EXHAUSTIVE_BELOW:
            scores, rows = self._exhaustive(q, k, sel)
        else:
            scores, rows = self._filtered(q, k, sel, frac)
            short = (rows[:, :want] < 0).any(axis=1)
            if short.any():  # budget exhausted before k allowed rows were reached
                s2, r2 = self._exhaustive(q[short], k, sel)
                scores[short], rows[short] = s2, r2
        del _bitmap  # kept alive until here: IDSelectorBitmap does not copy it
        bad = (rows >= 0) & ~mask[np.maximum(rows, 0)]
        if bad.any():  # never expected; keep the contract even if a faiss path ignores `sel`
            log.error("filtered search returned %d disallowed rows; dropping them", int(bad.sum()))
            rows[bad], scores[bad] = -1, -np.inf
        return scores, rows

    def _filtered(
        self, q: np.ndarray, k: int, sel: Any, frac: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Selector search with the candidate budget scaled by 1/frac."""
        idx = faiss.downcast_index(self._cpu)
        widen = 1.0 / frac
        ivf = faiss.try_extract_index_ivf(idx)
        if ivf is not None:
            params = _ivf_params(sel, min(ivf.nlist, math.ceil(ivf.nprobe * widen)))
            if isinstance(idx, faiss.IndexRefine):
                params = _refine_params(params, idx.k_factor)
        elif isinstance(idx, faiss.IndexHNSW):
            params = _faiss.SearchParametersHNSW()
            params.sel = sel
            params.efSearch = math.ceil(max(idx.hnsw.efSearch, k) * min(widen, 16.0))
        else:
            params = _params(sel)
        return idx.search(q, k, params=params)

    def _exhaustive(self, q: np.ndarray, k: int, sel: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scan every allowed row (complete: returns min(k, allowed) results)."""
        idx = faiss.downcast_index(self._cpu)
        if isinstance(idx, faiss.IndexRefine):  # the refine codes are the most precise copy
            return faiss.downcast_index(idx.refine_index).search(q, k, params=_params(sel))
        if isinstance(idx, faiss.IndexHNSW):
            return faiss.downcast_index(idx.storage).search(q, k, params=_params(sel))
        ivf = faiss.try_extract_index_ivf(idx)
        if ivf is not None:
            return idx.search(q, k, params=_ivf_params(sel, ivf.nlist))
        return idx.search(q, k, params=_params(sel))

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the CPU index (with its search parameters) to ``path``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu, str(p))

    @classmethod
    def load(cls, path: str | Path, use_gpu: bool | None = None) -> AnnIndex:
        """Read an index; ``use_gpu=None`` moves it to all GPUs when faiss sees any.

        ``use_gpu=True`` raises if there is no GPU or the index type has no faiss GPU version
        (HNSW, fast-scan PQ, refine and RaBitQ do not; flat, ivf_flat, ivf_fp16 and ivf_sq8
        do); with ``None`` such indexes stay on CPU with a warning.
        """
        cpu = faiss.read_index(str(path))
        ngpu = faiss.get_num_gpus()
        want = ngpu > 0 if use_gpu is None else use_gpu
        if not want:
            return cls(cpu)
        if ngpu == 0:
            raise RuntimeError("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
        try:
            gpu = faiss.index_cpu_to_all_gpus(cpu)
        except (RuntimeError, AttributeError) as exc:
            if use_gpu:
                raise RuntimeError(f"cannot move {_kind_of(cpu)} index to GPU: {exc}") from exc
            log.warning("keeping %s index on CPU: no GPU version (%s)", _kind_of(cpu), exc)
            return cls(cpu)
        log.info("loaded %s index on %d GPU(s)", _kind_of(cpu), ngpu)
        return cls(cpu, gpu_index=gpu)
