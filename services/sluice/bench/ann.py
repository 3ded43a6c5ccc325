"""ANN index benchmark: exact vs IVF-Flat vs HNSW vs compressed IVF, on real and scaled catalogs.

    python -m sluice.bench.ann [--sizes 10000,100000,1000000] [--out var/bench/ann] [--quick]

Datasets
  * ``beauty``: the real Amazon-Beauty title embeddings (all-MiniLM-L6-v2); 500 held-out items
    (not in the database) are the queries.
  * ``synth-N``: N synthetic item vectors grown from the real ones. Each is a random real item
    moved a uniform fraction of the way towards one of its 10 nearest real neighbours, plus
    Gaussian noise with the real data's covariance (its principal directions and variances)
    scaled by ``SIGMA``, then L2-normalised. Queries are held-out real items (never used as
    parents) plus the same noise. ``SIGMA`` = 0.3 matches the real data's median query
    neighbour similarity at rank 10 and 100 at the real catalog's size.

Each index is built with ``--build-threads`` and searched with ``--threads`` (default 1). For
every index a sweep of nprobe / efSearch / k_factor gives recall@100 against exact search and
batch QPS; the fastest setting with recall >= ``--target-recall`` is its operating point, where
single-query (batch size 1) latency is also measured. Outputs (CSV, PNG, JSON) go to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sluice import paths
from sluice.recall.ann_index import (
    DEFAULT_LARGE_KIND,
    KINDS,
    AnnIndex,
    build_index,
    default_nlist,
    factory_string,
)

log = logging.getLogger(__name__)

ITEMS_TSV = paths.shared_data() / "amazon-beauty" / "items.tsv"
CACHE = paths.var("cache", "beauty_minilm.npy")
K = 100
SIGMA = 0.3
N_NEIGHBOURS = 10
TARGET_SPEEDUP = 10.0
TARGET_MEMORY = 0.25
TARGET_N = 1_000_000
DESCRIPTION = "Benchmark exact, IVF, HNSW and compressed ANN indexes (recall@100, QPS, memory)."


# ---------------------------------------------------------------------------------------------
# data
def load_real_embeddings(
    items: Path, cache: Path, encode_if_missing: bool = True
) -> np.ndarray | None:
    """MiniLM embeddings of every title in ``items`` (cached as .npy outside the repo)."""
    titles = _read_titles(items) if items.exists() else None
    if cache.exists():
        emb = np.ascontiguousarray(np.load(cache), dtype=np.float32)
        if titles is None or len(emb) == len(titles):
            return emb
        log.warning("cache %s has %d rows for %d titles; re-encoding", cache, len(emb), len(titles))
    if titles is None or not encode_if_missing:
        return None
    from sluice.embed.text import MiniLMEncoder

    log.info("encoding %d titles with MiniLM (cached to %s)", len(titles), cache)
    emb = MiniLMEncoder().encode(titles, progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, emb)
    return emb


def _read_titles(path: Path) -> list[str]:
    titles = []
    with path.open(encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            parts = line.rstrip("\n").split("\t", 1)
            titles.append(parts[1] if len(parts) > 1 else "")
    return titles


def random_parents(n: int, d: int, seed: int) -> np.ndarray:
    """Stand-in for the real embeddings when they are unavailable (smoke runs only)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d)).astype(np.float32)
    x: np.ndarray = centres[rng.integers(0, 64, n)] + 0.7 * rng.standard_normal(
        (n, d), dtype=np.float32
    )
    faiss.normalize_L2(x)
    return x


@dataclass
class Generator:
    """Grows a catalog of any size from real vectors (see module docstring)."""

    parents: np.ndarray
    sigma: float = SIGMA
    neighbours: np.ndarray = field(init=False)
    noise_basis: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        p = self.parents
        flat = faiss.IndexFlatIP(p.shape[1])
        flat.add(p)
        _, nn = flat.search(p, N_NEIGHBOURS + 1)
        self.neighbours = nn[:, 1:]
        cov = np.cov((p - p.mean(axis=0)).T)
        w, v = np.linalg.eigh(cov)
        # noise = z @ basis has the data covariance: basis.T @ basis = cov
        self.noise_basis = (v * np.sqrt(np.clip(w, 0.0, None))).T.astype(np.float32)

    def noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, self.parents.shape[1]), dtype=np.float32)
        return np.asarray(self.sigma * (z @ self.noise_basis), dtype=np.float32)

    def items(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.parents.shape[1]), dtype=np.float32)
        for a in range(0, n, chunk):
            m = min(chunk, n - a)
            i = rng.integers(0, len(self.parents), m)
            j = self.neighbours[i, rng.integers(0, N_NEIGHBOURS, m)]
            lam = rng.uniform(0.0, 1.0, (m, 1)).astype(np.float32)
            y = self.parents[i] + lam * (self.parents[j] - self.parents[i]) + self.noise(m, rng)
            faiss.normalize_L2(y)
            out[a : a + m] = y
        return out

    def queries(self, held_out: np.ndarray, seed: int) -> np.ndarray:
        y = held_out + self.noise(len(held_out), np.random.default_rng(seed))
        faiss.normalize_L2(y)
        return np.ascontiguousarray(y)


@dataclass
class Dataset:
    name: str
    db: np.ndarray
    queries: np.ndarray
    synthetic: bool


def make_datasets(
    sizes: Sequence[int], n_queries: int, real: np.ndarray | None, seed: int, use_real: bool
) -> list[tuple[str, int, Callable[[], Dataset]]]:
    """(name, size, lazy builder) per dataset; large catalogs are generated when needed."""
    if real is None:
        log.warning("real embeddings unavailable: synthetic data grows from random clusters")
        parents_all = random_parents(12_000, 384, seed)
    else:
        parents_all = real
    perm = np.random.default_rng(seed).permutation(len(parents_all))
    held_out = parents_all[perm[:n_queries]]
    parents = parents_all[perm[n_queries:]]
    out: list[tuple[str, int, Callable[[], Dataset]]] = []
    if use_real and real is not None:
        out.append(("beauty", len(parents), lambda: Dataset("beauty", parents, held_out, False)))
    gen: list[Generator] = []

    def synth(n: int) -> Dataset:
        if not gen:
            gen.append(Generator(parents))
        g = gen[0]
        return Dataset(f"synth-{n}", g.items(n, seed + n), g.queries(held_out, seed + 1), True)

    for n in sizes:
        out.append((f"synth-{n}", n, functools.partial(synth, n)))
    return out


# ---------------------------------------------------------------------------------------------
# measurement
def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k over queries."""
    k = truth.shape[1]
    hits = [len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


@dataclass
class Timing:
    """Throughput of one batch search; CPU-time figures are robust to other jobs on the host."""

    qps: float  # queries / wall second
    qps_cpu: float  # queries / CPU second of this process
    cpu_per_wall: float  # ~1.0 for one uncontended thread; lower when the host is busy


def timed_search(
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], q: np.ndarray
) -> tuple[np.ndarray, Timing]:
    """Search all queries as one batch (after a warm-up).

    Always the whole batch: faiss's exact search switches to BLAS only for batches of
    >= ``distance_compute_blas_threshold`` (128,000) query floats, 334 queries at d=384.
    """
    fn(q[: min(len(q), 20)])
    t0, c0 = time.perf_counter(), time.process_time()
    _, rows = fn(q)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return rows, Timing(len(q) / wall, len(q) / max(cpu, 1e-9), cpu / wall)


@dataclass
class Latency:
    """Batch-size-1 latency over ``n`` queries (wall, and CPU time of this process)."""

    p50_ms: float
    p99_ms: float
    p50_cpu_ms: float
    n: int


def latency(
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    q: np.ndarray,
    n: int,
    budget_s: float,
) -> Latency:
    """Search queries one at a time (as the recall service does) for at most ``budget_s``."""
    fn(q[:1])
    wall: list[float] = []
    cpu: list[float] = []
    t_end = time.perf_counter() + budget_s
    for i in range(min(n, len(q))):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(q[i : i + 1])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if time.perf_counter() > t_end and len(wall) >= 20:
            break
    w, c = np.array(wall) * 1e3, np.array(cpu) * 1e3
    return Latency(
        float(np.percentile(w, 50)), float(np.percentile(w, 99)), float(np.median(c)), len(w)
    )


def sweep_grid(kind: str, nlist: int | None, quick: bool) -> list[dict[str, int]]:
    """Search settings tried for ``kind``."""
    if kind == "flat":
        return [{}]
    if kind == "hnsw":
        return [{"ef_search": e} for e in ((64, 128, 256) if quick else (64, 128, 256, 512, 1024))]
    assert nlist is not None
    probes = [p for p in (8, 16, 24, 32, 48, 64, 96, 128, 256) if p <= nlist]
    if quick:
        probes = [p for p in probes if p in (16, 32, 64)]
    if kind == "ivf_pq_refine":
        return [{"nprobe": p, "k_factor": f} for p in probes if p >= 32 for f in (4, 8, 16)]
    return [{"nprobe": p} for p in probes]


@dataclass
class Row:
    """One (dataset, index, search setting) measurement.

    ``speedup`` and ``speedup_b1`` compare CPU-time throughput with exact search (batch, and
    batch size 1); ``*_wall`` are the same from wall-clock time.
    """

    dataset: str
    n: int
    kind: str
    factory: str
    params: str
    recall: float
    qps: float
    qps_cpu: float
    cpu_per_wall: float
    speedup: float = float("nan")
    speedup_wall: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p50_cpu_ms: float = float("nan")
    latency_n: int = 0
    speedup_b1: float = float("nan")
    speedup_b1_wall: float = float("nan")
    memory_bytes: int = 0
    memory_ratio: float = float("nan")
    build_s: float = 0.0
    meets_target: bool = False


def _fmt_params(p: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in p.items()) or "-"


def bench_dataset(
    ds: Dataset, kinds: Sequence[str], args: argparse.Namespace
) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """Sweeps and operating points of every kind on one dataset."""
    n, d = ds.db.shape
    faiss.omp_set_num_threads(args.build_threads)
    gt_index = faiss.IndexFlatIP(d)
    gt_index.add(ds.db)
    gt_scores, truth = gt_index.search(ds.queries, K)
    del gt_index
    info = {
        "dataset": ds.name,
        "n": n,
        "synthetic": ds.synthetic,
        "median_sim_at_1": float(np.median(gt_scores[:, 0])),
        "median_sim_at_10": float(np.median(gt_scores[:, 9])),
        "median_sim_at_100": float(np.median(gt_scores[:, K - 1])),
    }
    sweeps: list[Row] = []
    points: list[Row] = []
    flat: Row | None = None
    for kind in kinds:
        faiss.omp_set_num_threads(args.build_threads)
        t0 = time.perf_counter()
        idx = AnnIndex(build_index(ds.db, kind, nlist=args.nlist or None))
        build_s = time.perf_counter() - t0
        factory = factory_string(kind, n, d, nlist=args.nlist or default_nlist(n))
        mem = idx.memory_bytes()
        faiss.omp_set_num_threads(args.threads)
        search = functools.partial(idx.search, k=K)
        kind_rows: list[Row] = []
        for params in sweep_grid(kind, idx.nlist, args.quick):
            if params:
                idx.set_search_params(**params)
            rows, t = timed_search(search, ds.queries)
            recall = recall_at_k(rows, truth)
            r = Row(ds.name, n, kind, factory, _fmt_params(params), recall, t.qps, t.qps_cpu,
                    t.cpu_per_wall, memory_bytes=mem, build_s=build_s)  # fmt: skip
            kind_rows.append(r)
            log.info("%s %s %s recall=%.4f qps=%.1f (cpu %.1f)", ds.name, kind, r.params, recall,
                     t.qps, t.qps_cpu)  # fmt: skip
        ok = [r for r in kind_rows if r.recall >= args.target_recall]
        best = max(ok, key=lambda r: r.qps_cpu) if ok else max(kind_rows, key=lambda r: r.recall)
        if best.params != "-":
            idx.set_search_params(
                **{k: int(v) for k, v in (kv.split("=") for kv in best.params.split(","))}
            )
        lat = latency(search, ds.queries, args.latency_queries, args.time_budget)
        best.p50_ms, best.p99_ms, best.p50_cpu_ms, best.latency_n = (
            lat.p50_ms, lat.p99_ms, lat.p50_cpu_ms, lat.n
        )  # fmt: skip
        if flat is None:
            flat = best  # kinds start with flat
        for r in kind_rows:
            r.speedup = r.qps_cpu / flat.qps_cpu
            r.speedup_wall = r.qps / flat.qps
            r.memory_ratio = r.memory_bytes / flat.memory_bytes
        best.speedup_b1 = flat.p50_cpu_ms / best.p50_cpu_ms
        best.speedup_b1_wall = flat.p50_ms / best.p50_ms
        best.meets_target = (
            best.recall >= args.target_recall
            and min(best.speedup, best.speedup_b1) >= TARGET_SPEEDUP
            and best.memory_ratio <= TARGET_MEMORY
        )
        sweeps += kind_rows
        points.append(best)
        del idx, search
    return sweeps, points, info


# ---------------------------------------------------------------------------------------------
# output
COLUMNS = [f.name for f in Row.__dataclass_fields__.values()]


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()}
            )


def print_table(points: Sequence[Row]) -> None:
    head = (
        f"{'dataset':<13}{'n':>8} {'index':<14}{'params':<21}{'R@100':>7}{'QPS':>8}{'xflat':>7}"
        f"{'p50ms':>8}{'p99ms':>8}{'xflat':>7}{'MiB':>7}{'/flat':>6}{'build':>7}{'cpu':>5} target"
    )
    print(head)
    print("-" * len(head))
    for r in points:
        print(
            f"{r.dataset:<13}{r.n:>8} {r.kind:<14}{r.params:<21}{r.recall:>7.4f}{r.qps_cpu:>8.0f}"
            f"{r.speedup:>7.1f}{r.p50_cpu_ms:>8.2f}{r.p99_ms:>8.2f}{r.speedup_b1:>7.1f}"
            f"{r.memory_bytes / 2**20:>7.1f}{r.memory_ratio:>6.3f}{r.build_s:>7.1f}"
            f"{r.cpu_per_wall:>5.2f} {'yes' if r.meets_target else 'no'}"
        )
    print(
        "QPS: one batch on 1 thread, per CPU-second; p50: batch size 1, CPU ms; p99: wall ms;\n"
        "xflat: vs exact search; build: train+add wall s; cpu: CPU/wall in the batch (1 = idle)"
    )


def pareto(rows: Sequence[Row]) -> list[Row]:
    """Settings no other setting beats on both recall and throughput, by throughput."""
    front: list[Row] = []
    for r in sorted(rows, key=lambda r: (-r.qps_cpu, -r.recall)):
        if not front or r.recall > front[-1].recall:
            front.append(r)
    return front[::-1]


def plot(
    out: Path, sweeps: Sequence[Row], points: Sequence[Row], synth_sizes: Sequence[int]
) -> list[str]:
    """recall-vs-QPS at the largest synthetic size, and scaling of build/memory/latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if synth_sizes:
        big = f"synth-{max(synth_sizes)}"
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        at_big = [r for r in sweeps if r.dataset == big]
        for i, kind in enumerate(KINDS):
            rs = [r for r in at_big if r.kind == kind]
            if not rs:
                continue
            colour = f"C{i}"
            ax.scatter([r.qps_cpu for r in rs], [r.recall for r in rs], s=14, alpha=0.5, c=colour)
            front = pareto(rs)
            ax.plot([r.qps_cpu for r in front], [r.recall for r in front], "o-", c=colour,
                    label=kind)  # fmt: skip
        flat = [r for r in at_big if r.kind == "flat"]
        if flat:
            ax.axvline(TARGET_SPEEDUP * flat[0].qps_cpu, color="grey", ls=":", lw=0.8,
                       label=f"{TARGET_SPEEDUP:g}x exact")  # fmt: skip
        ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("queries per CPU-second (1 thread, batch)")
        ax.set_ylabel(f"recall@{K} vs exact")
        ax.set_title(f"ANN recall vs throughput, {max(synth_sizes):,} items")
        ax.legend()
        ax.grid(alpha=0.3)
        name = f"ann_recall_qps_{max(synth_sizes)}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for kind in KINDS:
            rs = sorted(
                (r for r in points if r.dataset.startswith("synth-") and r.kind == kind),
                key=lambda r: r.n,
            )
            if not rs:
                continue
            ns = [r.n for r in rs]
            axes[0].plot(ns, [max(r.build_s, 1e-3) for r in rs], "o-", label=kind)
            axes[1].plot(ns, [r.memory_bytes / 2**20 for r in rs], "o-", label=kind)
            if kind == "flat":
                axes[1].plot(ns, [TARGET_MEMORY * r.memory_bytes / 2**20 for r in rs], ":",
                             c="grey", label=f"{TARGET_MEMORY:g} x flat")  # fmt: skip
            axes[2].plot(ns, [r.p50_cpu_ms for r in rs], "o-", label=kind)
        for ax, title in zip(
            axes,
            ("build time (s)", "index memory (MiB)", "p50 latency, batch size 1 (CPU ms)"),
            strict=True,
        ):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("catalog size")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ann_scaling.png", dpi=110)
        plt.close(fig)
        files.append("ann_scaling.png")
    return files


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sluice.bench.ann", description=DESCRIPTION)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="synthetic catalog sizes")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", type=Path, default=Path("var/bench/ann"))
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="search threads (default 1)")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=10.0,
        help="seconds of batch-size-1 latency timing per index (at least 20 queries)",
    )
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default ~4*sqrt(n))")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--no-real", action="store_true", help="skip the real Beauty catalog")
    ap.add_argument("--items", type=Path, default=ITEMS_TSV)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 10k items, few settings")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if args.quick:
        args.sizes, args.queries, args.latency_queries, args.time_budget = "5000", 100, 50, 2.0
        args.no_real = True
    sizes = [int(s) for s in args.sizes.split(",") if s]
    # flat first: it is the reference for speedup and memory ratio
    kinds = ["flat"] + [k for k in args.kinds.split(",") if k and k != "flat"]
    args.out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    real = load_real_embeddings(args.items, args.cache, encode_if_missing=not args.quick)
    t_start = time.perf_counter()
    all_sweeps: list[Row] = []
    all_points: list[Row] = []
    infos = []
    for name, size, make in make_datasets(sizes, args.queries, real, args.seed, not args.no_real):
        t0 = time.perf_counter()
        ds = make()
        log.info(
            "dataset %s: %d items, %d queries (%.1fs)",
            name,
            size,
            len(ds.queries),
            time.perf_counter() - t0,
        )
        sweeps, points, info = bench_dataset(ds, kinds, args)
        del ds
        all_sweeps += sweeps
        all_points += points
        infos.append(info)
        write_csv(args.out / "ann_sweep.csv", all_sweeps)
        write_csv(args.out / "ann_results.csv", all_points)
    print(
        f"\nfaiss {faiss.__version__}, CPU {cpu_model()} ({os.cpu_count()} cores), "
        f"search threads {args.threads}, build threads {args.build_threads}, "
        f"{args.queries} queries, recall@{K} vs exact"
    )
    print_table(all_points)
    print("\nmedian similarity of the exact neighbours at rank 1 / 10 / 100 (realism check):")
    for info in infos:
        print(
            f"  {info['dataset']:<14}{info['median_sim_at_1']:.3f} / "
            f"{info['median_sim_at_10']:.3f} / {info['median_sim_at_100']:.3f}"
        )
    figures = plot(args.out, all_sweeps, all_points, sizes)
    chosen = [
        r for r in all_points if r.kind == DEFAULT_LARGE_KIND and r.dataset.startswith("synth")
    ]
    big = max(chosen, key=lambda r: r.n) if chosen else None
    if big is not None and big.n < TARGET_N:
        print(f"\n(the target is defined at {TARGET_N:,} items; run --sizes {TARGET_N})")
    elif big is not None:
        print(
            f"\ntarget at {big.n:,} ({DEFAULT_LARGE_KIND}, {big.params}): recall {big.recall:.4f}"
            f" >= {args.target_recall}; speedup {big.speedup:.1f}x batch / {big.speedup_b1:.1f}x"
            f" batch-1 >= {TARGET_SPEEDUP:g}x (wall clock {big.speedup_wall:.1f}x /"
            f" {big.speedup_b1_wall:.1f}x); memory {big.memory_ratio:.3f} <= "
            f"{TARGET_MEMORY} of flat -> {'MET' if big.meets_target else 'NOT MET'}"
        )
    meta = {
        "command": " ".join(["python -m sluice.bench.ann", *(argv or sys.argv[1:])]),
        "faiss": faiss.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "search_threads": args.threads,
        "build_threads": args.build_threads,
        "queries": args.queries,
        "sigma": SIGMA,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "wall_s": time.perf_counter() - t_start,
        "datasets": infos,
        "figures": figures,
    }
    (args.out / "ann_meta.json").write_text(json.dumps(meta, indent=2))
    print(
        f"\nwrote {args.out}/ann_results.csv, ann_sweep.csv, ann_meta.json, " + ", ".join(figures)
    )
    print(
        f"load average start {load0[0]:.2f}, end {os.getloadavg()[0]:.2f}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}"
    )
    return 0


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        # libgomp reads this once at load: re-exec so that idle OpenMP threads sleep instead of
        # spinning. Spinning threads on a busy 2-core host made PQ training 15x slower.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "sluice.bench.ann", *sys.argv[1:]])
    raise SystemExit(main())
