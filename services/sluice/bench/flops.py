"""The physical limit: matmul FLOP/s of this machine vs what the fine ranker achieves.

``sluice bench flops --artifacts DIR``

1. **Peak**: fp32 ``torch.mm`` of square matrices at ``--threads`` threads (the thread count
   the Triton model uses: ``torch_threads`` in config.pbtxt), best of several repeats per size.
2. **Work per request**: ``torch.utils.flop_counter.FlopCounterMode`` on ``FineRanker.score``
   at the served shapes (one row: history [1, 50], candidates [1, 256], query [1, 384]),
   for Recommend (no query) and Search (query).
3. **The model alone** (in process): requests/s and FLOP/s at batch sizes 1..64 -- the
   ceiling without Triton -- of ``FineRanker.score`` in torch (same threads) and of the
   version's ``model.onnx`` in onnxruntime, what Triton serves, at the config's intra-op
   threads, with the served share of search rows.
4. **Served under saturation**: a Triton server (the build's config, dynamic batching;
   ``--instances`` overrides its instance count) driven at high concurrency with real
   tensors, by Triton's own C++ ``perf_analyzer`` (``--driver perf_analyzer``, the default:
   the load generator shares the cores, and it costs them the least) or by the project's
   client processes (``--driver sluice``); requests/s x FLOPs/request as a fraction of the
   peak (target >= 25%), the cores each Triton process used, and where the time goes from
   Triton's own counters: request vs queue vs compute input/infer/output duration, mean
   batch size, and the FLOP/s *inside* ``compute_infer`` (the python backend's execute()).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.bench.load import (
    ClientPool,
    apply_env,
    command_line,
    cpu_busy_snapshot,
    machine_info,
    percentile,
)

TARGET_FRACTION = 0.25  # the cost issue's target for the served ranker
PY_SPY = paths.var("tools", "py-spy")  # pip download py-spy; unzip its script here


def _print(s: str) -> None:
    print(s, flush=True)


def summarize_profile(path: Path, root: str = "execute", top: int = 8) -> dict[str, Any]:
    """Where the python backend's ``execute()`` spends its samples (py-spy speedscope file):
    the share of all samples under ``root``, the share of those inside ``FineRanker.score``
    (the torch forward), and the top leaf lines (C calls count on the Python line calling
    them)."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    total = under = in_score = 0.0
    leaves: dict[str, float] = {}
    for prof in data["profiles"]:
        for stack, w in zip(prof["samples"], prof["weights"], strict=True):
            total += w
            names = [frames[i]["name"] for i in stack]
            if not any(n.endswith(root) for n in names):
                continue
            under += w
            if any(n.endswith("FineRanker.score") or n == "score" for n in names):
                in_score += w
            leaf = frames[stack[-1]]
            key = f"{leaf['name']} ({Path(leaf.get('file', '?')).name}:{leaf.get('line', '?')})"
            leaves[key] = leaves.get(key, 0.0) + w
    ranked = sorted(leaves.items(), key=lambda kv: -kv[1])[:top]
    return {
        "samples_in_execute_share": round(under / total, 3) if total else 0.0,
        "torch_forward_share_of_execute": round(in_score / under, 3) if under else 0.0,
        "top_lines": {k: round(v / under, 3) for k, v in ranked} if under else {},
    }


def matmul_peak(
    threads: int,
    sizes: Sequence[int] = (256, 512, 1024, 2048),
    seconds: float = 2.0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Best fp32 GEMM FLOP/s per size (2 n^3 per n x n product)."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    results = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev)
        b = torch.randn(n, n, device=dev)
        c = torch.empty(n, n, device=dev)
        for _ in range(3):
            torch.mm(a, b, out=c)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = math.inf
        end = time.perf_counter() + seconds
        reps = 0
        while time.perf_counter() < end or reps < 3:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            reps += 1
        results[n] = 2.0 * n**3 / best
    peak = max(results.values())
    return {
        "threads": threads,
        "device": device,
        "by_size_gflops": {n: round(v / 1e9, 2) for n, v in results.items()},
        "peak_gflops": round(peak / 1e9, 2),
    }


def served_inputs(batch: int, search: bool, num_items: int, seed: int = 0) -> tuple[Any, ...]:
    """Tensors at the served shapes: [B, 50] history, [B, 256] candidates, [B, 384], [B]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, num_items + 1, (batch, 50), generator=g)
    history[:, :10] = 0  # some left padding, as real histories have
    cands = torch.randint(1, num_items + 1, (batch, 256), generator=g)
    cands[:, 200:] = 0  # the gateway sends 200 coarse candidates per 256-wide row
    query = torch.randn(batch, 384, generator=g)
    has_query = torch.full((batch,), search, dtype=torch.bool)
    return history, cands, query, has_query


def flops_per_request(model: Any, search: bool) -> tuple[int, dict[str, int]]:
    """FLOPs of ``model.score`` for one served row, total and by operator."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = served_inputs(1, search, model.num_items)
    with torch.inference_mode():
        model.score(*inputs)  # warm-up: the served item table is built once, not per request
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.score(*inputs)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def _time_calls(call: Callable[[], object], batch: int, seconds: float) -> dict[str, float]:
    """Calls ``call`` (one batch of ``batch`` requests) for ``seconds`` after 3 warm-ups:
    median and best wall time per call (best-of is comparable with the best-of matmul
    peak), CPU time per call, and the requests per second each implies."""
    for _ in range(3):
        call()
    times: list[float] = []
    c0 = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / len(times)
    med, best = float(np.median(times)), float(min(times))
    return {
        "batch": batch,
        "ms_per_call": round(med * 1000, 3),
        "best_ms_per_call": round(best * 1000, 3),
        "cpu_ms_per_call": round(cpu * 1000, 3),
        "requests_per_s": round(batch / med, 1),
        "best_requests_per_s": round(batch / best, 1),
    }


def _add_rates(row: dict[str, Any], flops: float, peak: float, per_core: float) -> None:
    """Adds FLOP/s and fractions of the peak to a :func:`_time_calls` row, for ``flops``
    per request: at the median and the best call, and per CPU-second actually obtained
    (which removes most of a busy host's effect)."""
    row["gflops"] = round(row["requests_per_s"] * flops / 1e9, 2)
    row["fraction_of_peak"] = round(row["gflops"] / peak, 4)
    row["best_gflops"] = round(row["best_requests_per_s"] * flops / 1e9, 2)
    row["best_fraction_of_peak"] = round(row["best_gflops"] / peak, 4)
    cpu_gflops = row["batch"] * flops / (row["cpu_ms_per_call"] / 1000) / 1e9
    row["gflops_per_cpu_core"] = round(cpu_gflops, 2)
    row["fraction_of_per_core_peak"] = round(cpu_gflops / per_core, 4)


def _rate_line(label: str, row: dict[str, Any]) -> str:
    """One printed line for a row :func:`_add_rates` completed."""
    return (
        f"  {label}, batch {row['batch']:>3}: median {row['ms_per_call']:7.2f} ms/call "
        f"({row['gflops']:6.2f} GFLOP/s = {row['fraction_of_peak']:.1%} of peak), best "
        f"{row['best_ms_per_call']:7.2f} ms ({row['best_fraction_of_peak']:.1%}), per CPU-second "
        f"{row['gflops_per_cpu_core']:.1f} GFLOP/s = {row['fraction_of_per_core_peak']:.1%} of "
        "the per-core peak"
    )


def model_throughput(
    model: Any, threads: int, batches: Sequence[int], seconds: float = 2.0, search: bool = False
) -> list[dict[str, float]]:
    """``FineRanker.score`` in this process per batch size: median and best wall time per
    call (best-of is comparable with the best-of matmul peak), and CPU time per call."""
    import torch

    torch.set_num_threads(threads)
    out = []
    for b in batches:
        inputs = served_inputs(b, search, model.num_items)
        with torch.inference_mode():
            out.append(_time_calls(partial(model.score, *inputs), b, seconds))
    return out


def onnx_throughput(
    path: Path,
    threads: int,
    batches: Sequence[int],
    num_items: int,
    search_share: float,
    seconds: float = 2.0,
) -> list[dict[str, float]]:
    """The version's ``model.onnx`` in onnxruntime (what Triton runs), ``threads`` intra-op
    threads, per batch size; a ``search_share`` of the rows carry a query, as served."""
    import onnxruntime as ort

    from sluice.fine.contract import INPUTS

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    out = []
    for b in batches:
        history, cands, query, _ = served_inputs(b, False, num_items)
        has_query = np.random.default_rng(b).random((b, 1)) < search_share
        feed = {
            spec.name: np.ascontiguousarray(x, dtype=spec.numpy_dtype)
            for spec, x in zip(
                INPUTS, (history.numpy(), cands.numpy(), query.numpy(), has_query), strict=True
            )
        }
        out.append(_time_calls(partial(session.run, None, feed), b, seconds))
    return out


def profile_ops(model: Any, threads: int, batch: int, search: bool = False) -> list[dict[str, Any]]:
    """Top operators by self CPU time of one batch (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    inputs = served_inputs(batch, search, model.num_items)
    with torch.inference_mode():
        for _ in range(3):
            model.score(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                model.score(*inputs)
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        rows.append(
            {
                "op": e.key,
                "calls": e.count // 20,
                "self_us_per_batch": round(e.self_cpu_time_total / 20, 1),
            }
        )
    return rows


def saturate_triton(
    artifacts: Path,
    tensors: list[tuple[np.ndarray, ...]],
    concurrency: int,
    duration_s: float,
    clients: int,
    gpu: bool,
    log_path: Path,
    warmup_s: float = 3.0,
    profile: Path | None = None,
    driver: str = "perf_analyzer",
    instances: int = 0,
) -> dict[str, Any]:
    """Triton on a temporary copy of the build's ranker, saturated at ``concurrency`` by
    ``driver``; ``instances`` > 0 overrides the config's instance count."""
    from sluice.bench.compare import (
        TritonServer,
        ensure_perf_analyzer,
        perf_analyzer_json,
        run_perf_analyzer,
        temp_repository,
        triton_breakdown,
    )
    from sluice.bench.load import proc_usage, process_tree

    overrides = {"count": str(instances)} if instances > 0 else None
    with tempfile.TemporaryDirectory(prefix="sluice-flops-") as tmp:
        repo = temp_repository(artifacts, True, Path(tmp) / "repo", overrides)
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(TritonServer(repo, log_path, gpu=gpu))
            if driver == "perf_analyzer":
                binary = ensure_perf_analyzer()
                data = perf_analyzer_json(tensors, Path(tmp) / "inputs.json")
                run_perf_analyzer(  # warm-up, to steady state
                    binary, srv.url, data, concurrency, Path(tmp) / "warm.csv", 3000
                )
            else:
                pool = stack.enter_context(
                    ClientPool(
                        {
                            "kind": "triton",
                            "url": srv.url,
                            "tensors": tensors,
                            "threads": concurrency,
                        },
                        clients,
                    )
                )
                pool.warm(list(range(20)), 30.0)
                pool.closed_loop(concurrency, warmup_s, 10.0)  # reach steady state
            tree = process_tree(srv.proc.pid) if srv.proc is not None else []
            stubs = tree[1:]  # process_tree lists the server first
            spy = None
            if profile is not None and PY_SPY.exists() and stubs:
                spy = subprocess.Popen(
                    [
                        str(PY_SPY),
                        "record",
                        "--nonblocking",
                        "-r",
                        "100",
                        "-d",
                        str(int(duration_s)),
                        "-p",
                        str(stubs[0]),
                        "-f",
                        "speedscope",
                        "-o",
                        str(profile),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            m0, b0, l0 = srv.metrics(), cpu_busy_snapshot(), os.getloadavg()[0]
            cpu0 = {pid: proc_usage([pid])[0] for pid in tree}
            w0 = time.monotonic()
            if driver == "perf_analyzer":
                row = run_perf_analyzer(
                    binary,
                    srv.url,
                    data,
                    concurrency,
                    Path(tmp) / "run.csv",
                    int(duration_s * 1000 / 3),  # perf_analyzer measures 3 stable windows
                )
                requests_per_s = row["Inferences/Second"]
                client = {
                    "client_p50_ms": round(row.get("p50 latency", math.nan) / 1000, 2),
                    "client_p99_ms": round(row.get("p99 latency", math.nan) / 1000, 2),
                    "perf_analyzer_stable": bool(row.get("stable")),
                }
            else:
                rec, cpus, _ = pool.closed_loop(concurrency, duration_s, 10.0, lead_s=0.5)
                ok = rec.code == 0
                lat = rec.latency_s[ok] * 1000
                requests_per_s = float(ok.sum()) / duration_s
                client = {
                    "client_p50_ms": round(percentile(lat, 50), 2),
                    "client_p99_ms": round(percentile(lat, 99), 2),
                    "errors": int((~ok).sum()),
                    "client_cpu_max": round(max(cpus), 3),
                }
            elapsed = time.monotonic() - w0
            m1, b1 = srv.metrics(), cpu_busy_snapshot()
            cores = {pid: (proc_usage([pid])[0] - cpu0[pid]) / elapsed for pid in tree}
            if spy is not None:
                try:
                    spy.wait(duration_s + 60)
                except subprocess.TimeoutExpired:
                    spy.kill()
    tb = triton_breakdown(m0, m1)
    if driver == "perf_analyzer":  # failed requests, as Triton counted them
        failed = "nv_inference_request_failure"
        client["errors"] = int(m1.get(failed, 0.0) - m0.get(failed, 0.0))
    server = srv.proc.pid if srv.proc is not None else -1
    return {
        "driver": driver,
        "elapsed_s": round(elapsed, 2),  # perf_analyzer measures until its windows are stable
        "instances": instances or "config",
        "concurrency": concurrency,
        "clients": clients if driver == "sluice" else 1,
        "requests_per_s": round(requests_per_s, 1),
        **client,
        "machine_busy_pct": round(100 * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1e-9), 1),
        "loadavg1": [round(l0, 2), round(os.getloadavg()[0], 2)],
        "triton": tb,
        "triton_cpu_cores": round(sum(cores.values()), 3),
        # the server (gRPC, scheduling, tensor copies) vs the python backend's stubs
        "triton_server_cores": round(cores.get(server, 0.0), 3),
        "python_stub_cores": [round(c, 3) for pid, c in cores.items() if pid != server],
    }


def add_flops_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch_threads of the build's config.pbtxt)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="Triton KIND_GPU config")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--driver",
        choices=("perf_analyzer", "sluice"),
        default="perf_analyzer",
        help="what saturates Triton: its C++ perf_analyzer, or the project's client processes",
    )
    ap.add_argument("--clients", type=int, default=2, help="--driver sluice: client processes")
    ap.add_argument(
        "--instances",
        type=int,
        default=0,
        help="Triton model instances (default: the build's config)",
    )
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--payloads", type=int, default=100)
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--no-triton", action="store_true", help="skip the served measurement")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for this process and Triton (repeatable)",
    )
    ap.add_argument("--out", type=Path, default=paths.var("bench", "flops"))
    ap.add_argument("--figures", type=Path, default=None)


def _config_threads(artifacts: Path) -> int:
    import re

    from sluice.artifacts import Artifacts

    cfg = (Artifacts(artifacts).model_repository / "fine_ranker" / "config.pbtxt").read_text()
    m = re.search(r'intra_op_thread_count"\s*value:\s*\{\s*string_value:\s*"(\d+)"', cfg)
    return int(m.group(1)) if m else 1


def flops_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    env = apply_env(args.env)  # before torch loads libgomp (it reads OMP_* once)
    import torch

    from sluice.artifacts import Artifacts
    from sluice.fine.contract import ONNX_FILE
    from sluice.fine.model import FineRanker

    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    threads = args.threads or _config_threads(args.artifacts)
    _print(
        f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg']}; "
        f"torch {torch.__version__}, {threads} threads"
    )
    peak = matmul_peak(threads, device=args.device)
    _print(
        f"fp32 matmul peak: {peak['peak_gflops']} GFLOP/s ({peak['by_size_gflops']}) "
        f"load {os.getloadavg()[0]:.1f}"
    )
    a = Artifacts(args.artifacts)
    model = FineRanker.load(
        a.ranker_dir, map_location=args.device if args.device != "cpu" else "cpu"
    )
    f_rec, ops_rec = flops_per_request(model, search=False)
    f_search, ops_search = flops_per_request(model, search=True)
    _print(
        f"FLOPs per scored request (1 row of 256 candidates): recommend {f_rec / 1e6:.2f} M, "
        f"search {f_search / 1e6:.2f} M; by op (recommend): "
        + ", ".join(
            f"{k} {v / 1e6:.2f}M" for k, v in sorted(ops_rec.items(), key=lambda kv: -kv[1])
        )
    )
    batches = [int(x) for x in args.batches.split(",") if x]
    alone = model_throughput(model, threads, batches)
    per_core = peak["peak_gflops"] / threads
    for r in alone:
        _add_rates(r, f_rec, peak["peak_gflops"], per_core)
        _print(_rate_line("model alone", r))
    served_threads = _config_threads(args.artifacts)
    onnx_path = a.ranker_dir / ONNX_FILE
    onnx_alone = []
    if onnx_path.exists():
        onnx_alone = onnx_throughput(
            onnx_path, served_threads, batches, model.num_items, search_share=0.5
        )
        f_mixed = (f_rec + f_search) / 2
        for r in onnx_alone:
            _add_rates(r, f_mixed, peak["peak_gflops"], per_core)
            label = f"model.onnx alone (onnxruntime, {served_threads} thread(s), half search)"
            _print(_rate_line(label, r))
    ops = profile_ops(model, threads, 32)
    _print(
        "  top ops at batch 32 (self CPU us/batch): "
        + ", ".join(f"{o['op']} {o['self_us_per_batch']}" for o in ops[:8])
    )
    summary: dict[str, Any] = {
        "command": command_line(argv),
        "machine": info,
        "torch": torch.__version__,
        "threads": threads,
        "peak": peak,
        "env": env,
        "flops_per_request": {
            "recommend": f_rec,
            "search": f_search,
            "by_op_recommend": ops_rec,
            "by_op_search": ops_search,
        },
        "model_alone": alone,
        "onnx_alone": onnx_alone,
        "onnx_threads": served_threads,
        "model_alone_top_ops_b32": ops,
        "num_items": a.manifest.get("num_items"),
    }
    if not args.no_triton:
        from sluice.bench.compare import real_tensors, single_row

        tensors = single_row(real_tensors(args.artifacts, args.payloads, 0.5)[0])
        share_search = float(np.mean([bool(t[3][0, 0]) for t in tensors]))
        f_served = share_search * f_search + (1 - share_search) * f_rec
        by = (
            "perf_analyzer"
            if args.driver == "perf_analyzer"
            else f"{args.clients} client processes"
        )
        _print(
            f"saturating Triton: closed loop, concurrency {args.concurrency} from {by}, "
            f"{args.duration:g} s …"
        )
        sat = saturate_triton(
            args.artifacts,
            tensors,
            args.concurrency,
            args.duration,
            args.clients,
            args.gpu,
            args.out / "triton.log",
            profile=args.out / "triton_stub.speedscope.json",
            driver=args.driver,
            instances=args.instances,
        )
        prof = args.out / "triton_stub.speedscope.json"
        if prof.exists():
            sat["execute_profile"] = summarize_profile(prof)
            ep = sat["execute_profile"]
            _print(
                f"py-spy of the python backend stub: {ep['samples_in_execute_share']:.0%} of "
                f"samples in execute(), {ep['torch_forward_share_of_execute']:.0%} of those in "
                "FineRanker.score; top lines: "
                + ", ".join(f"{k} {v:.0%}" for k, v in ep["top_lines"].items())
            )
        tb = sat["triton"]
        achieved = sat["requests_per_s"] * f_served
        busy = tb["infer_busy_s"]
        inside = tb["requests"] * f_served / busy if busy else math.nan
        # FLOP/s per CPU-second Triton (server + python stubs) actually got
        per_cpu = achieved / 1e9 / max(sat["triton_cpu_cores"], 1e-9)
        sat.update(
            {
                "flops_per_request_served": f_served,
                "model_busy_fraction": round(busy / sat["elapsed_s"], 3),
                "gflops_per_triton_cpu_core": round(per_cpu, 3),
                "fraction_of_per_core_peak": round(per_cpu / per_core, 4),
                "achieved_gflops": round(achieved / 1e9, 3),
                "fraction_of_peak": round(achieved / 1e9 / peak["peak_gflops"], 4),
                "gflops_inside_compute_infer": round(inside / 1e9, 3),
                "fraction_inside_compute_infer": round(inside / 1e9 / peak["peak_gflops"], 4),
            }
        )
        summary["served"] = sat
        met = "MET" if sat["fraction_of_peak"] >= TARGET_FRACTION else "NOT MET"
        _print(
            f"served: {sat['requests_per_s']} req/s (client p50 {sat['client_p50_ms']} ms, "
            f"p99 {sat['client_p99_ms']} ms, machine {sat['machine_busy_pct']}% busy, "
            f"load {sat['loadavg1']}, {sat['driver']}, instances {sat['instances']}) x "
            f"{f_served / 1e6:.2f} MFLOP = "
            f"{sat['achieved_gflops']} GFLOP/s = {sat['fraction_of_peak']:.1%} of the "
            f"{peak['peak_gflops']} GFLOP/s peak (target >= {TARGET_FRACTION:.0%}: {met}); "
            f"Triton used {sat['triton_cpu_cores']} cores (server "
            f"{sat['triton_server_cores']}, python stubs {sat['python_stub_cores']}): "
            f"{sat['gflops_per_triton_cpu_core']} "
            f"GFLOP/s per CPU-second = {sat['fraction_of_per_core_peak']:.1%} of the per-core peak"
        )
        ms = {k: tb[k] / 1000 for k in tb if k.endswith("_us")}
        _print(
            f"where the time goes (Triton, per request): request {ms['request_us']:.2f} ms = "
            f"queue {ms['queue_us']:.2f} + input {ms['compute_input_us']:.2f} + "
            f"infer {ms['compute_infer_us']:.2f} (its batch's execution) + "
            f"output {ms['compute_output_us']:.2f} ms; mean batch {tb['mean_batch']}; the model "
            f"instances were busy at most about {sat['model_busy_fraction']:.0%} of the time "
            f"(summed over instances), so at least {sat['gflops_inside_compute_infer']} GFLOP/s "
            f"({sat['fraction_inside_compute_infer']:.1%} of peak) inside execute() (Triton "
            "charges each request its whole batch's time, and larger batches take longer: "
            "the busy time is an upper estimate, exact when batch sizes are equal)"
        )
    (args.out / "flops.json").write_text(json.dumps(summary, indent=2, default=str))
    figs = plot_flops(summary, args.out)
    if args.figures:
        import shutil

        args.figures.mkdir(parents=True, exist_ok=True)
        for p in figs:
            shutil.copy2(p, args.figures / f"flops-{p.name}")
    _print(f"wrote {args.out}/flops.json")
    return 0


def plot_flops(summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = summary["peak"]["peak_gflops"]
    labels, vals = ["matmul peak"], [peak]
    for r in summary["model_alone"]:
        labels.append(f"model alone\nbatch {r['batch']}")
        vals.append(r["gflops"])
    if "served" in summary:
        s = summary["served"]
        labels += ["Triton inside\ncompute_infer", "Triton served\n(req/s x FLOPs)"]
        vals += [s["gflops_inside_compute_infer"], s["achieved_gflops"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(
        labels,
        vals,
        color=["tab:gray"]
        + ["tab:blue"] * len(summary["model_alone"])
        + ["tab:orange", "tab:red"][: len(vals) - 1 - len(summary["model_alone"])],
    )
    for b, v in zip(bars, vals, strict=True):
        ax.text(
            b.get_x() + b.get_width() / 2,
            v,
            f"{v:.1f}\n({v / peak:.0%})",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.axhline(
        TARGET_FRACTION * peak,
        color="red",
        ls="--",
        lw=0.8,
        label=f"{TARGET_FRACTION:.0%} of peak (target)",
    )
    ax.set_ylabel("GFLOP/s (fp32)")
    ax.set_title(
        f"fine ranker vs matmul peak, {summary['threads']} threads, {summary['machine']['cpu']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    p = out / "flops.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sluice bench flops", description=__doc__.split("\n")[0])
    add_flops_args(ap)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = ap.parse_args(argv)
    return flops_main(args, ["flops", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
