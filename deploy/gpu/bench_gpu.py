"""GPU measurements that fit a lent device; run by deploy/gpu/bench-gpu.sh.

Self-contained: imports torch, numpy, faiss if present, onnxruntime if present, and from
Sluice only ``sluice.fine.model`` (the ranker), ``sluice.fine.contract`` (the served
shapes) and ``sluice.fine.onnx_export`` (with ``PYTHONPATH=services``: no install, no
generated protobuf code). Works with numpy 1 or 2, Python 3.11 or 3.12.

1. ranker: ``FineRanker.score`` on the served shapes (history 50, 256 candidates, a
   384-d query on half the rows), fp32 against bf16 and fp16, batch 1 to 256 rows, on
   CUDA (and fp32 on the CPU for scale); the reduced precisions' scores against fp32.
2. retrieval: exact top-k over 1M item vectors (64-d, as the behaviour index; 384-d, as
   the text index): a matmul and torch.topk on CUDA (fp32; fp16 with its recall) against
   the CPU FAISS flat index (numpy when FAISS is absent).
3. onnx: the exported ranker (model.onnx, what Triton serves) on onnxruntime's CUDA
   provider, only where onnxruntime-gpu is installed (its wheel is far over what a device
   call carries), and on its CPU provider with the served config's one thread.

Everything goes under --out: results.json, ranker.csv, retrieval.csv, onnx.csv and
summary.md (tables for docs/benchmarks.md). ``--cpu-smoke`` runs every part at toy sizes
on the CPU to check the script where there is no GPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sluice.fine.contract import CANDIDATES_PER_ROW, HISTORY_LEN
from sluice.fine.model import FineRanker, RankerConfig

TEXT_DIM = 384
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_GPU = 2  # exit status when there is nothing to measure


def log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(
    fn: Callable[[], Any], sync: Callable[[], None], min_s: float, max_reps: int
) -> dict[str, float]:
    """Median and p90 wall time (ms) of ``fn`` after warm-up, ``sync`` after each call."""
    for _ in range(3):
        fn()
    sync()
    times: list[float] = []
    end = time.perf_counter() + min_s
    while len(times) < 5 or (time.perf_counter() < end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "ms_p50": statistics.median(times),
        "ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "reps": len(times),
    }


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# -- 1. the ranker in torch ------------------------------------------------------------
def make_ranker(args: argparse.Namespace) -> FineRanker:
    if args.ranker:
        log(f"ranker: loading {args.ranker}")
        return FineRanker.load(args.ranker)
    log(f"ranker: untrained FineRanker over {args.items:,} items (default RankerConfig)")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((args.items + 1, TEXT_DIM), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    text[0] = 0.0
    return FineRanker(args.items, text, RankerConfig()).eval()


def served_inputs(num_items: int, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Padded like the fine stage pads: short histories left-padded, the last row's
    candidates half padding, a query on every other row."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, num_items + 1, (batch, HISTORY_LEN), generator=g)
    lengths = torch.randint(1, HISTORY_LEN + 1, (batch,), generator=g)
    history[torch.arange(HISTORY_LEN).unsqueeze(0) < (HISTORY_LEN - lengths).unsqueeze(1)] = 0
    candidates = torch.randint(1, num_items + 1, (batch, CANDIDATES_PER_ROW), generator=g)
    candidates[-1, CANDIDATES_PER_ROW // 2 :] = 0
    query = torch.randn(batch, TEXT_DIM, generator=g)
    query = query / query.norm(dim=1, keepdim=True)
    has_query = torch.arange(batch) % 2 == 0
    return history, candidates, query, has_query


def bench_ranker(
    ranker: FineRanker, device: torch.device, dtypes: Sequence[str], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Latency rows per (device, dtype, batch) and accuracy rows per dtype against fp32."""
    rows: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    sync = synchronizer(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # as served: Triton's CPU config runs one intra-op thread
        torch.set_num_threads(args.cpu_threads)
    reference: torch.Tensor | None = None
    check = [t.to(device) for t in served_inputs(ranker.num_items, args.accuracy_rows, seed=1)]
    for name in dtypes:
        # a copy per precision, from the fp32 weights (bf16 -> fp16 would round twice)
        model = copy.deepcopy(ranker).to(device=device, dtype=DTYPES[name]).eval()
        with torch.inference_mode():
            scores = model.score(*check).float()
        if name == "fp32":
            reference = scores
        elif reference is not None:
            diff = (scores - reference).abs()
            top_ref = reference.topk(10, dim=1).indices
            top = scores.topk(10, dim=1).indices
            overlap = [
                len(set(a.tolist()) & set(b.tolist())) / 10
                for a, b in zip(top, top_ref, strict=True)
            ]
            accuracy.append(
                {
                    "device": device.type,
                    "dtype": name,
                    "rows": args.accuracy_rows,
                    "max_abs_diff": float(diff.max()),
                    "mean_abs_diff": float(diff.mean()),
                    "score_std_fp32": float(reference.std()),
                    "top10_overlap": float(np.mean(overlap)),
                }
            )
        for batch in args.batches:
            inputs = [t.to(device) for t in served_inputs(ranker.num_items, batch, seed=batch)]

            def run(m: FineRanker = model, x: list[torch.Tensor] = inputs) -> None:
                with torch.inference_mode():
                    m.score(*x)

            t = timed(run, sync, args.min_s, args.max_reps)
            rows.append(
                {
                    "device": device.type,
                    "dtype": name,
                    "batch": batch,
                    "threads": torch.get_num_threads() if device.type == "cpu" else "",
                    **t,
                    "rows_per_s": batch / (t["ms_p50"] / 1e3),
                    "candidates_per_s": batch * CANDIDATES_PER_ROW / (t["ms_p50"] / 1e3),
                }
            )
            log(f"ranker {device.type} {name} batch {batch}: {t['ms_p50']:.3f} ms")
        del model
    torch.set_num_threads(threads)
    return rows, accuracy


# -- 2. exact top-k retrieval ----------------------------------------------------------
def device_topk(table: torch.Tensor, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k on the device: queries to the device, one matmul, topk, ids back."""
    x = torch.from_numpy(queries).to(table.device, non_blocking=True).to(table.dtype)
    return torch.topk(x @ table.T, k, dim=1).indices.cpu().numpy()


def cpu_topk(index: Any, base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k on the CPU: the FAISS flat index, or numpy without FAISS."""
    if index is not None:
        return np.asarray(index.search(queries, k)[1])
    s = queries @ base.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def bench_retrieval(device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    faiss: Any
    try:
        import faiss

        cpu_kind = f"faiss {faiss.__version__} IndexFlatIP"
    except ImportError:
        faiss = None
        cpu_kind = "numpy matmul + argpartition (faiss not installed)"
    log(f"retrieval: {args.retrieval_items:,} items, CPU baseline: {cpu_kind}")
    rows: list[dict[str, Any]] = []
    sync = synchronizer(device)
    rng = np.random.default_rng(2)
    k = args.topk
    for dim in args.retrieval_dims:
        base = rng.standard_normal((args.retrieval_items, dim), dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        queries = rng.standard_normal((max(args.retrieval_batches), dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        tables = {"fp32": torch.from_numpy(base).to(device)}
        if device.type == "cuda":
            tables["fp16"] = tables["fp32"].half()
        index = None
        if faiss is not None:
            index = faiss.IndexFlatIP(dim)
            index.add(base)
        for batch in args.retrieval_batches:
            q = queries[:batch]
            found = {name: device_topk(t, q, k) for name, t in tables.items()}
            found["cpu"] = cpu_topk(index, base, q, k)
            times = {
                name: timed(partial(device_topk, t, q, k), sync, args.min_s, args.max_reps)
                for name, t in tables.items()
            }
            t_cpu = timed(
                partial(cpu_topk, index, base, q, k),
                lambda: None,
                args.min_s,
                max(5, args.max_reps // 10),
            )
            row: dict[str, Any] = {
                "items": args.retrieval_items,
                "dim": dim,
                "k": k,
                "batch": batch,
                "device": device.type,
                "device_ms_p50": times["fp32"]["ms_p50"],
                "device_ms_p90": times["fp32"]["ms_p90"],
                "cpu_kind": cpu_kind,
                "cpu_threads": _cpu_threads(faiss),
                "cpu_ms_p50": t_cpu["ms_p50"],
                "cpu_ms_p90": t_cpu["ms_p90"],
                "speedup": t_cpu["ms_p50"] / times["fp32"]["ms_p50"],
                "recall_vs_cpu": _recall(found["fp32"], found["cpu"]),
            }
            if "fp16" in times:
                row["device_fp16_ms_p50"] = times["fp16"]["ms_p50"]
                row["fp16_recall_vs_exact"] = _recall(found["fp16"], found["fp32"])
            rows.append(row)
            log(
                f"retrieval d={dim} batch {batch}: {device.type} "
                f"{times['fp32']['ms_p50']:.2f} ms, cpu {t_cpu['ms_p50']:.2f} ms, "
                f"recall {row['recall_vs_cpu']:.4f}"
            )
        tables.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cpu_threads(faiss: Any) -> int:
    if faiss is not None and hasattr(faiss, "omp_get_max_threads"):
        return int(faiss.omp_get_max_threads())
    return os.cpu_count() or 1


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(
        np.mean(
            [
                len(set(a.tolist()) & set(b.tolist())) / len(b)
                for a, b in zip(got, want, strict=True)
            ]
        )
    )


# -- 3. the ONNX ranker on onnxruntime -------------------------------------------------
def bench_onnx(
    ranker: FineRanker, device: torch.device, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [], "onnxruntime is not installed"
    providers = ort.get_available_providers()
    gpu = "CUDAExecutionProvider" in providers
    note = (
        f"onnxruntime {ort.__version__}: providers {providers}"
        if gpu
        else f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is "
        "not installed; its wheel, ~244 MiB for 1.31, is over the 64 MiB a device call "
        "carries): CPU provider only"
    )
    log(f"onnx: {note}")
    from sluice.fine.onnx_export import export_onnx

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(ranker, Path(tmp) / "model.onnx")
        plans: list[tuple[str, list[Any], list[int]]] = [
            ("cpu-1-thread", ["CPUExecutionProvider"], [b for b in args.batches if b <= 64])
        ]
        if gpu:
            plans.insert(
                0, ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], args.batches)
            )
        check = served_inputs(ranker.num_items, args.accuracy_rows, seed=1)
        with torch.inference_mode():
            want = ranker.score(*check).numpy()
        for name, plan_providers, batches in plans:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1 if name.startswith("cpu") else 0
            session = ort.InferenceSession(str(path), options, providers=plan_providers)

            def feed(x: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
                h, c, q, s = (t.numpy() for t in x)
                return {
                    "HISTORY": h,
                    "CANDIDATES": c,
                    "QUERY_EMB": q,
                    "HAS_QUERY": s.reshape(-1, 1),
                }

            (got,) = session.run(["SCORES"], feed(check))
            diff = float(np.abs(got - want).max())
            for batch in batches:
                f = feed(served_inputs(ranker.num_items, batch, seed=batch))
                t = timed(
                    partial(session.run, ["SCORES"], f),
                    lambda: None,
                    args.min_s,
                    args.max_reps,
                )
                rows.append(
                    {
                        "provider": name,
                        "batch": batch,
                        **t,
                        "rows_per_s": batch / (t["ms_p50"] / 1e3),
                        "max_abs_diff_vs_torch_fp32": diff,
                    }
                )
                log(f"onnx {name} batch {batch}: {t['ms_p50']:.3f} ms")
    return rows, note


# -- output ------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    m = results["machine"]
    parts = [
        f"# GPU benchmark ({'CPU smoke run: not figures' if results['cpu_smoke'] else m['gpu']})",
        "",
        f"{m['when']}; torch {m['torch']}, numpy {m['numpy']}, Python {m['python']}, "
        f"{m['cpu_count']} CPUs.",
        "",
        "## Ranker (torch, served shapes: history 50, 256 candidates per row)",
        "",
        table(
            results["ranker"],
            ["device", "dtype", "threads", "batch", "ms_p50", "ms_p90", "rows_per_s"],
        ),
        "",
        "Scores against fp32 on the same device:",
        "",
        table(
            results["ranker_accuracy"],
            [
                "device",
                "dtype",
                "rows",
                "max_abs_diff",
                "mean_abs_diff",
                "score_std_fp32",
                "top10_overlap",
            ],
        ),
        "",
        "## Exact top-k retrieval",
        "",
        table(
            results["retrieval"],
            [
                "items",
                "dim",
                "k",
                "batch",
                "device_ms_p50",
                "device_fp16_ms_p50",
                "cpu_ms_p50",
                "speedup",
                "recall_vs_cpu",
                "fp16_recall_vs_exact",
            ],
        ),
        "",
        f"CPU baseline: {results['retrieval'][0]['cpu_kind'] if results['retrieval'] else '-'}",
        "",
        "## ONNX ranker on onnxruntime",
        "",
        results["onnx_note"],
        "",
        table(
            results["onnx"],
            ["provider", "batch", "ms_p50", "ms_p90", "rows_per_s", "max_abs_diff_vs_torch_fp32"],
        ),
        "",
    ]
    return "\n".join(parts)


def machine(device: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the script"
    )
    ap.add_argument(
        "--ranker", type=Path, help="a fine_ranker version directory (default: untrained)"
    )
    ap.add_argument(
        "--items", type=int, default=100_000, help="catalog size of the untrained ranker"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--accuracy-rows", type=int, default=256)
    ap.add_argument("--retrieval-items", type=int, default=1_000_000)
    ap.add_argument("--retrieval-dims", type=int, nargs="+", default=[64, 384])
    ap.add_argument("--retrieval-batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--topk", type=int, default=1000, help="recall's candidate budget")
    ap.add_argument("--min-s", type=float, default=0.5, help="time measured per point at least")
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads of CPU rows")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ranker", "retrieval", "onnx"])
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.items, args.batches, args.accuracy_rows = 2000, [1, 4], 8
        args.retrieval_items, args.retrieval_batches, args.topk = 20_000, [1, 4], 50
        args.min_s, args.max_reps = 0.0, 5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
    elif args.cpu_smoke:
        device = torch.device("cpu")
    else:
        log("no CUDA device visible to torch: nothing measured (--cpu-smoke checks the script)")
        return NO_GPU
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "cpu_smoke": args.cpu_smoke,
        "machine": machine(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ranker": [],
        "ranker_accuracy": [],
        "retrieval": [],
        "onnx": [],
        "onnx_note": "skipped",
    }

    def save() -> None:  # after every part: a run cut short keeps what it measured
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        write_csv(args.out / "ranker.csv", results["ranker"] + results["ranker_accuracy"])
        write_csv(args.out / "retrieval.csv", results["retrieval"])
        write_csv(args.out / "onnx.csv", results["onnx"])
        (args.out / "summary.md").write_text(summary(results))

    ranker = make_ranker(args)
    if "ranker" not in args.skip:
        gpu_rows, accuracy = bench_ranker(ranker, device, list(DTYPES), args)
        results["ranker"] += gpu_rows
        results["ranker_accuracy"] += accuracy
        if (
            device.type == "cuda"
        ):  # the CPU for scale: fp32, the batch sizes Triton's CPU config takes
            cpu_args = argparse.Namespace(
                **{**vars(args), "batches": [b for b in args.batches if b in (1, 16, 64)]}
            )
            cpu_rows, _ = bench_ranker(ranker, torch.device("cpu"), ["fp32"], cpu_args)
            results["ranker"] += cpu_rows
        save()
    if "retrieval" not in args.skip:
        results["retrieval"] = bench_retrieval(device, args)
        save()
    if "onnx" not in args.skip:
        results["onnx"], results["onnx_note"] = bench_onnx(ranker, device, args)
    save()
    log(f"done: {args.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
