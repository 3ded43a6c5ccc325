"""Side-by-side ratios, each measured in one run, and the scaling sweeps.

``sluice bench compare grpc``
    The whole cascade over gRPC (a started cluster; by default two: fine ranker on Triton, and
    fine ranker as TorchBackend inside the fine service) against the same stage objects in this
    process without gRPC (``Gateway`` + local stages + ``TorchBackend``), same artifacts,
    same requests, sequential closed loop. Requests are interleaved (each request goes to every
    variant in a random order), so background load on a shared machine hits all variants alike.
``sluice bench compare batching``
    Two Triton servers on temp copies of the model repository that differ only in the
    ``dynamic_batching`` block (removed in one). Each is driven directly with the project's
    ``TritonBackend`` from client processes with open-loop Poisson arrivals at the same offered
    rates (interleaved step by step) using real padded tensors from the cascade. Reported: the
    highest throughput each sustains with p99 <= ``--p99-ms``, and their ratio.
``sluice bench compare perf-analyzer``
    Triton's own ``perf_analyzer`` (from the tritonclient 2.51.0 wheel, unpacked into
    ``var/tools``; the venv keeps its tritonclient) at fixed concurrency against the project's
    client at the same concurrency, on the same real input tensors.
``sluice bench scale``
    p99, per-stage time and RSS per service vs catalog size (one cluster per build) and vs the
    candidate budgets (``SLUICE_GATEWAY_RECALL_CANDIDATES`` / ``..._COARSE_CANDIDATES``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.bench.load import (
    DEFAULT_BUDGETS_MS,
    KIND_RECOMMEND,
    KIND_SEARCH,
    KIND_TRITON,
    ClientPool,
    LoadConfig,
    Records,
    ServiceMonitor,
    apply_env,
    cluster_pids,
    command_line,
    cpu_busy_snapshot,
    load_workload,
    machine_info,
    make_requests,
    percentile,
    poisson_schedule,
    run_load,
    started_cluster,
    title_words,
    write_csv,
)

TOOLS = paths.var("tools")
PA_VERSION = "2.51.0"
TRITON_METRICS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def _print(s: str) -> None:
    print(s, flush=True)


def _command(argv: Sequence[str] | None) -> str:
    return command_line(argv)


# ---------------------------------------------------------------------------------------------
# Triton on its own (a model repository of our choosing)
def strip_block(text: str, name: str) -> str:
    """``text`` without the top-level ``name { ... }`` block (brace-matched)."""
    m = re.search(rf"(^|\n)\s*{re.escape(name)}\s*\{{", text)
    if not m:
        return text
    i = text.index("{", m.start())
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[: m.start()] + "\n" + text[j + 1 :].lstrip("\n")
    raise ValueError(f"unbalanced braces after {name}")


def temp_repository(
    artifacts: Path, dynamic_batching: bool, into: Path, overrides: dict[str, str] | None = None
) -> Path:
    """A model repository under ``into`` with only the build's ranker version; its configs
    (config.pbtxt and every configs/*.pbtxt) without ``dynamic_batching`` when asked.
    Weights are symlinked; ``model_repository/`` is never touched."""
    from sluice.artifacts import Artifacts

    a = Artifacts(artifacts)
    src = a.model_repository / "fine_ranker"
    dst = into / "fine_ranker"
    (dst / "configs").mkdir(parents=True, exist_ok=True)
    vdir = dst / str(a.ranker_version)
    vdir.mkdir(parents=True, exist_ok=True)
    for f in a.ranker_dir.iterdir():
        target = vdir / f.name
        if not target.exists():
            target.symlink_to(f.resolve())
    for p in [src / "config.pbtxt", *sorted((src / "configs").glob("*.pbtxt"))]:
        rel = p.relative_to(src)
        text = p.read_text()
        if not dynamic_batching:
            text = strip_block(text, "dynamic_batching")
            text = "# benchmark variant: dynamic_batching removed\n" + text
        for key, value in (overrides or {}).items():
            text = re.sub(rf"{key}:\s*\S+", f"{key}: {value}", text)
        (dst / rel).write_text(text)
    return into


@dataclass
class TritonServer:
    """``tritonserver`` on free ports over a given repository (as ``sluice.launch`` runs it)."""

    repository: Path
    log_path: Path
    gpu: bool = False
    proc: subprocess.Popen[bytes] | None = None
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0

    def start(self, timeout_s: float = 240.0) -> TritonServer:
        from sluice.launch import free_ports
        from sluice.tools.triton_setup import (
            backend_dir,
            install_stub,
            triton_env,
            tritonserver_binary,
        )

        install_stub()
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        argv = [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir()}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--log-verbose=0",
            "--exit-timeout-secs=10",
        ]
        from sluice.fine.contract import model_config_name

        config_name = model_config_name(backend_dir(), gpu=self.gpu)
        if config_name:
            argv.append(f"--model-config-name={config_name}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=triton_env())
        url = f"http://127.0.0.1:{self.http_port}/v2/models/fine_ranker/ready"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited: see {self.log_path}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tritonserver not ready: see {self.log_path}")
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5.0
        ) as resp:
            return parse_triton_metrics(resp.read().decode())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> TritonServer:
        try:
            return self.start()
        except RuntimeError as err:  # see started_cluster: a hung stub; one fresh try
            print(f"  {err}; starting Triton again", flush=True)
            return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_triton_metrics(text: str, model: str = "fine_ranker") -> dict[str, float]:
    """Sum of each ``nv_inference_*`` counter for ``model`` over versions."""
    out = dict.fromkeys(TRITON_METRICS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or f'model="{model}"' not in line:
            continue
        name = line.split("{", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def triton_breakdown(m0: dict[str, float], m1: dict[str, float]) -> dict[str, float]:
    """Per-request averages (us), the mean batch size, and the model's busy time between two
    metric snapshots."""
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in TRITON_METRICS}
    n = max(d["nv_inference_request_success"] + d["nv_inference_request_failure"], 1.0)
    execs = max(d["nv_inference_exec_count"], 1.0)
    return {
        "requests": d["nv_inference_request_success"],
        "executions": d["nv_inference_exec_count"],
        "mean_batch": round(d["nv_inference_count"] / execs, 2),
        "request_us": round(d["nv_inference_request_duration_us"] / n, 1),
        "queue_us": round(d["nv_inference_queue_duration_us"] / n, 1),
        "compute_input_us": round(d["nv_inference_compute_input_duration_us"] / n, 1),
        "compute_infer_us": round(d["nv_inference_compute_infer_duration_us"] / n, 1),
        "compute_output_us": round(d["nv_inference_compute_output_duration_us"] / n, 1),
        # Each request accrues its whole batch's execution time, so compute_infer_us is the
        # time of the execution a request was in; the model instance's busy time is about
        # the cumulative infer time x executions / requests (exact for equal batch sizes).
        "infer_busy_s": round(
            d["nv_inference_compute_infer_duration_us"]
            * execs
            / max(d["nv_inference_count"], 1.0)
            / 1e6,
            4,
        ),
    }


# ---------------------------------------------------------------------------------------------
# real fine-ranker inputs: the padded tensors the fine stage sends for real requests
def real_tensors(
    artifacts: Path, n: int, search_share: float, seed: int = 0
) -> tuple[list[tuple[np.ndarray, ...]], list[int]]:
    """Tensors (history, candidates, query_emb, has_query) for ``n`` real requests: the
    gateway's history, recall, and coarse ranking run in process, then ``FineEngine.tensors``."""
    import torch

    from sluice.artifacts import Artifacts
    from sluice.config import GatewaySettings
    from sluice.domain import Budget, RankContext, RequestKind
    from sluice.embed.text import MiniLMEncoder
    from sluice.fine.engine import FineEngine
    from sluice.wiring import BY_NAME

    torch.set_num_threads(1)
    a = Artifacts(artifacts)
    settings = GatewaySettings()
    users, histories = a.users()
    hist_of = dict(zip(users, histories, strict=True))
    recaller = BY_NAME["recall"].load(BY_NAME["recall"].settings(artifacts=artifacts), [])
    coarse = BY_NAME["coarse"].load(BY_NAME["coarse"].settings(artifacts=artifacts), [])
    stage = FineEngine(a.catalog, backend=None)  # type: ignore[arg-type]  # tensors only
    rng = np.random.default_rng(seed)
    specs = make_requests(n, search_share, users, title_words(a.catalog.titles), rng)
    encoder = MiniLMEncoder(threads=1) if any(s.kind == KIND_SEARCH for s in specs) else None
    out, kinds = [], []
    for s in specs:
        history = np.asarray(hist_of.get(s.user_id, np.zeros(0, np.int64)), np.int64)[-50:]
        emb = encoder.encode([s.query])[0] if (encoder and s.query) else None
        exclude = history if s.kind == KIND_RECOMMEND else np.zeros(0, np.int64)
        ctx = RankContext(
            RequestKind.SEARCH if s.kind == KIND_SEARCH else RequestKind.RECOMMEND,
            query=s.query,
            query_embedding=emb,
            history_item_ids=history,
            exclude_item_ids=exclude,
        )
        cands = recaller.retrieve(ctx, Budget(settings.recall_candidates))
        cands = coarse.rank(ctx, cands, Budget(settings.coarse_candidates))
        out.append(tuple(np.ascontiguousarray(t) for t in stage.tensors(ctx, cands)))
        kinds.append(s.kind)
    return out, kinds


def perf_analyzer_json(tensors: Sequence[tuple[np.ndarray, ...]], path: Path) -> Path:
    """perf_analyzer ``--input-data`` file: one entry per request (batch 1; shapes without the
    batch dimension)."""
    names = ("HISTORY", "CANDIDATES", "QUERY_EMB", "HAS_QUERY")
    data = []
    for ts in tensors:
        entry = {}
        for name, t in zip(names, ts, strict=True):
            row = t[0]
            content = [bool(x) for x in row.tolist()] if t.dtype == bool else row.tolist()
            entry[name] = {"content": content, "shape": list(row.shape)}
        data.append(entry)
    path.write_text(json.dumps({"data": data}))
    return path


def single_row(tensors: Sequence[tuple[np.ndarray, ...]]) -> list[tuple[np.ndarray, ...]]:
    """Only requests of one row (<= 256 candidates), as the batching test sends them."""
    return [ts for ts in tensors if ts[0].shape[0] == 1]


# ---------------------------------------------------------------------------------------------
# perf_analyzer from the tritonclient 2.51.0 wheel
def ensure_perf_analyzer(tools: Path = TOOLS) -> Path:
    """``var/tools/perf_analyzer`` plus ``var/tools/lib`` with the sonames it needs
    (``libb64.so.0d``, ``libcudart.so.12`` from the nvidia-pytriton wheel's .libs)."""
    binary = tools / "perf_analyzer"
    lib = tools / "lib"
    if not binary.exists():
        tools.mkdir(parents=True, exist_ok=True)
        wheels = list(tools.glob(f"tritonclient-{PA_VERSION}-*.whl"))
        if not wheels:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    f"tritonclient=={PA_VERSION}",
                    "-d",
                    str(tools),
                ],
                check=True,
            )
            wheels = list(tools.glob(f"tritonclient-{PA_VERSION}-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith("/bin/perf_analyzer"))
            binary.write_bytes(z.read(member))
        binary.chmod(0o755)
    libs = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    libs = libs / "site-packages" / "nvidia_pytriton.libs"
    lib.mkdir(parents=True, exist_ok=True)
    for pattern, soname in (
        ("libb64-*.so.0d", "libb64.so.0d"),
        ("libcudart-*.so.12*", "libcudart.so.12"),
    ):
        found = sorted(libs.glob(pattern))
        link = lib / soname
        if found and not link.exists():
            link.symlink_to(found[0])
    return binary


def run_perf_analyzer(
    binary: Path,
    url: str,
    data: Path,
    concurrency: int,
    out_csv: Path,
    interval_ms: int,
    stability_pct: int = 100,
) -> dict[str, float]:
    """One perf_analyzer run at fixed concurrency; its CSV row (latencies in us).

    On a shared, loaded host its stability check (the last 3 windows within
    ``stability_pct`` %) may never pass; then the passes' median throughput and p99 are
    parsed from the verbose output and ``stable`` is 0.
    """
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [
            str(binary.parent / "lib"),
            *([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []),
        ]
    )
    argv = [
        str(binary),
        "-m",
        "fine_ranker",
        "-u",
        url,
        "-i",
        "grpc",
        "-b",
        "1",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--input-data",
        str(data),
        "--measurement-interval",
        str(interval_ms),
        "--stability-percentage",
        str(stability_pct),
        "--max-trials",
        "6",
        "--percentile",
        "99",
        "-v",
        "-f",
        str(out_csv),
    ]
    out_csv.unlink(missing_ok=True)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    (out_csv.with_suffix(".log")).write_text(" ".join(argv) + "\n" + proc.stdout + proc.stderr)
    if out_csv.exists():
        with out_csv.open() as f:
            row = next(csv.DictReader(f))
        return {k: float(v) for k, v in row.items() if v not in ("", None) and _isfloat(v)} | {
            "stable": 1.0
        }
    parsed = parse_perf_analyzer_text(proc.stdout)
    if not parsed:
        raise RuntimeError(
            f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return parsed | {"stable": 0.0}


def parse_perf_analyzer_text(text: str) -> dict[str, float]:
    """The last window's client numbers from perf_analyzer's (verbose) text output, keyed
    like its CSV columns (latencies in us)."""
    blocks = text.split("Client: ")
    if len(blocks) < 2:
        passes = re.findall(
            r"Pass \[\d+\] throughput: ([0-9.]+) infer/sec\. p99 latency: ([0-9.]+) usec", text
        )
        if not passes:
            return {}
        thr = [float(a) for a, _ in passes]
        p99 = [float(b) for _, b in passes]
        return {"Inferences/Second": float(np.median(thr)), "p99 latency": float(np.median(p99))}
    last = blocks[-1]
    out: dict[str, float] = {}
    m = re.search(r"Throughput:\s*([0-9.]+)", last)
    if m:
        out["Inferences/Second"] = float(m.group(1))
    for q in ("p50", "p90", "p95", "p99"):
        m = re.search(rf"{q} latency:\s*([0-9.]+)", last)
        if m:
            out[f"{q} latency"] = float(m.group(1))
    m = re.search(r"Avg (?:gRPC time|latency):\s*([0-9.]+)", last)
    if m:
        out["Avg latency"] = float(m.group(1))
    return out


def _isfloat(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# compare grpc: cascade over gRPC vs in process
def local_gateway(artifacts: Path, torch_threads: int = 1) -> Any:
    """The gateway with the same stage objects in this process (no gRPC, TorchBackend)."""
    import torch
    from threadpoolctl import threadpool_limits

    from sluice.artifacts import Artifacts
    from sluice.config import GatewaySettings
    from sluice.embed.onnx import query_encoder
    from sluice.eval.served import in_process_gateway, local_stages
    from sluice.gateway.pipeline import QueryEncoder

    torch.set_num_threads(torch_threads)
    threadpool_limits(limits=1)  # as the services run (ServiceSettings.blas_threads)
    a = Artifacts(artifacts)
    # queries at the precision the gateway service encodes them (SLUICE_GATEWAY_QUERY_ENCODER)
    precision = GatewaySettings().query_encoder
    encoder = query_encoder(artifacts, threads=torch_threads, precision=precision)
    gw = in_process_gateway(
        a, local_stages(a, torch_threads=torch_threads), QueryEncoder(encoder.encode)
    )
    gw.encode_query("warm up")
    return gw


def _local_call(
    gw: Any, kind: int, user: str, query: str, timeout_s: float
) -> tuple[float, list[int], bool]:
    t0 = time.perf_counter()
    if kind == KIND_SEARCH:
        res = gw.search(query=query, user_id=user, page_size=10, deadline_s=timeout_s)
    else:
        res = gw.recommend(user_id=user, page_size=10, deadline_s=timeout_s)
    dt = time.perf_counter() - t0
    return dt, [r.duration_us for r in res.reports], any(r.degraded for r in res.reports)


def _grpc_call(
    stub: Any, pb: Any, kind: int, user: str, query: str, timeout_s: float
) -> tuple[float, list[int], bool]:
    t0 = time.perf_counter()
    if kind == KIND_SEARCH:
        resp = stub.Search(
            pb.SearchRequest(query=query, user_id=user, page_size=10), timeout=timeout_s
        )
    else:
        resp = stub.Recommend(
            pb.RecommendRequest(user_id=user, surface=pb.SURFACE_HOME, page_size=10),
            timeout=timeout_s,
        )
    dt = time.perf_counter() - t0
    return dt, [s.duration_us for s in resp.stages], any(s.degraded for s in resp.stages)


def compare_grpc(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import grpc

    from sluice.v1 import storefront_pb2, storefront_pb2_grpc

    out: Path = args.out / "grpc"
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    _print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg']}")
    users, words = load_workload(args.artifacts)
    rng = np.random.default_rng(args.seed)
    specs = make_requests(
        args.requests + args.warmup_requests, args.search_share, users, words, rng
    )
    backends = [b for b in args.grpc_fine.split(",") if b]
    variants: dict[str, Any] = {}
    channels: list[Any] = []
    with contextlib.ExitStack() as stack:
        for backend in backends:
            _print(f"starting a cluster with the fine ranker on {backend} …")
            cluster = stack.enter_context(
                started_cluster(args.artifacts, fine_backend=backend, gpu=args.gpu)
            )
            ch = stack.enter_context(grpc.insecure_channel(cluster.gateway_address))
            channels.append(ch)
            variants[f"grpc_{backend}"] = storefront_pb2_grpc.StorefrontServiceStub(ch)
        _print("loading the same stages in this process (TorchBackend) …")
        gw = local_gateway(args.artifacts, args.torch_threads)
        names = ["local", *variants]
        timeout_s = args.timeout_ms / 1000.0
        rows: list[dict[str, Any]] = []
        load0 = os.getloadavg()[0]
        _print(f"{len(specs)} requests x {len(names)} variants, interleaved in random order …")
        for i, s in enumerate(specs):
            for name in rng.permutation(names).tolist():
                try:
                    if name == "local":
                        dt, st, deg = _local_call(gw, s.kind, s.user_id, s.query, timeout_s)
                    else:
                        dt, st, deg = _grpc_call(
                            variants[name], storefront_pb2, s.kind, s.user_id, s.query, timeout_s
                        )
                    code = "OK"
                except Exception as err:
                    dt, st, deg, code = float("nan"), [0, 0, 0, 0], False, type(err).__name__
                rows.append(
                    {
                        "i": i,
                        "warmup": i < args.warmup_requests,
                        "variant": name,
                        "kind": "search" if s.kind == KIND_SEARCH else "recommend",
                        "code": code,
                        "degraded": deg,
                        "latency_ms": round(dt * 1000, 3),
                        **{
                            f"{k}_ms": round(v / 1000, 3)
                            for k, v in zip(
                                ("recall", "coarse", "fine", "rerank"), st, strict=False
                            )
                        },
                    }
                )
            if (i + 1) % 50 == 0:
                _print(f"  {i + 1}/{len(specs)} (load {os.getloadavg()[0]:.1f})")
        null_ms = null_round_trips(channels[0], args.requests) if channels else []
        load1 = os.getloadavg()[0]
    fields = [
        "i",
        "warmup",
        "variant",
        "kind",
        "code",
        "degraded",
        "latency_ms",
        "recall_ms",
        "coarse_ms",
        "fine_ms",
        "rerank_ms",
    ]
    write_csv(out / "grpc_vs_local_requests.csv", rows, fields)
    summary = summarize_grpc(rows, names)
    summary.update(
        {
            "command": _command(argv),
            "machine": info,
            "loadavg_during": [load0, load1],
            "artifacts": str(args.artifacts),
            "requests": args.requests,
            "warmup": args.warmup_requests,
            "search_share": args.search_share,
            "torch_threads_local": args.torch_threads,
        }
    )
    if null_ms:
        summary["null_rpc"] = hop_floor(null_ms, summary)
    (out / "grpc_vs_local.json").write_text(json.dumps(summary, indent=2, default=str))
    write_csv(out / "grpc_vs_local.csv", summary["table"], list(summary["table"][0]))
    figs = plot_grpc(rows, names, out, f"{info['cpu']}, load {load0:.1f}→{load1:.1f}")
    _copy(figs, args.figures, "compare-grpc")
    _print_table(summary["table"])
    for r in summary["ratios"]:
        _print(
            f"{r['variant']} / local ({r['kind']}): median x{r['median_ratio']:.3f}, "
            f"p99 x{r['p99_ratio']:.3f}  (target median ≤ x1.20: "
            f"{'MET' if r['median_ratio'] <= 1.2 else 'NOT MET'})"
        )
    if "null_rpc" in summary:
        f = summary["null_rpc"]
        _print(
            f"floor: a null gRPC round trip (Health/Check, same server bootstrap) takes "
            f"p50 {f['p50_ms']:.3f} ms; the cascade makes {f['hops']} of them (client to "
            f"gateway, four stages, fine to Triton): {f['floor_ms']:.2f} ms on top of the "
            f"in-process median of {f['local_median_ms']:.2f} ms, so no Python gRPC split "
            f"can beat x{f['floor_ratio']:.2f} here"
        )
    _print(f"wrote {out}")
    return 0


CASCADE_HOPS = 6  # client -> gateway, gateway -> recall/coarse/fine/rerank, fine -> Triton


def null_round_trips(channel: Any, n: int) -> list[float]:
    """Wall ms of ``n`` sequential health checks: the framework's cost of one hop, no work."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest()
    for _ in range(20):
        stub.Check(req, timeout=5)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        stub.Check(req, timeout=5)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def hop_floor(null_ms: Sequence[float], summary: dict[str, Any]) -> dict[str, Any]:
    """The least a split of CASCADE_HOPS Python gRPC hops can add to the in-process median."""
    p50 = float(np.median(null_ms))
    local = next(
        r["p50_ms"] for r in summary["table"] if r["kind"] == "all" and r["variant"] == "local"
    )
    floor = CASCADE_HOPS * p50
    return {
        "n": len(null_ms),
        "p50_ms": round(p50, 3),
        "p99_ms": round(float(np.percentile(null_ms, 99)), 3),
        "hops": CASCADE_HOPS,
        "floor_ms": round(floor, 3),
        "local_median_ms": local,
        "floor_ratio": round((local + floor) / local, 3) if local else float("nan"),
    }


def summarize_grpc(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    table, ratios = [], []
    stats: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in ("all", "recommend", "search"):
        for name in names:
            sel = [
                r
                for r in rows
                if not r["warmup"]
                and r["variant"] == name
                and (kind == "all" or r["kind"] == kind)
                and r["code"] == "OK"
            ]
            lat = np.array([r["latency_ms"] for r in sel])
            errs = sum(
                1
                for r in rows
                if not r["warmup"]
                and r["variant"] == name
                and (kind == "all" or r["kind"] == kind)
                and r["code"] != "OK"
            )
            st: dict[str, Any] = {
                "kind": kind,
                "variant": name,
                "n": len(sel),
                "errors": errs,
                "degraded": sum(1 for r in sel if r["degraded"]),
                "p50_ms": round(percentile(lat, 50), 3),
                "p90_ms": round(percentile(lat, 90), 3),
                "p99_ms": round(percentile(lat, 99), 3),
                "mean_ms": round(float(lat.mean()), 3) if len(lat) else math.nan,
            }
            for stage in ("recall", "coarse", "fine", "rerank"):
                st[f"{stage}_p50_ms"] = round(
                    percentile(np.array([r.get(f"{stage}_ms", math.nan) for r in sel]), 50), 3
                )
            stats[(kind, name)] = st
            table.append(st)
        base = stats[(kind, "local")]
        for name in names:
            if name == "local":
                continue
            s = stats[(kind, name)]
            ratios.append(
                {
                    "kind": kind,
                    "variant": name,
                    "median_ratio": round(s["p50_ms"] / base["p50_ms"], 4),
                    "p99_ratio": round(s["p99_ms"] / base["p99_ms"], 4),
                    "median_extra_ms": round(s["p50_ms"] - base["p50_ms"], 3),
                    **{
                        f"{st}_p50_extra_ms": round(s[f"{st}_p50_ms"] - base[f"{st}_p50_ms"], 3)
                        for st in ("recall", "coarse", "fine", "rerank")
                    },
                }
            )
    return {"table": table, "ratios": ratios}


def plot_grpc(
    rows: Sequence[dict[str, Any]], names: Sequence[str], out: Path, title: str
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("recommend", "search"), strict=True):
        for name in names:
            lat = np.sort(
                [
                    r["latency_ms"]
                    for r in rows
                    if not r["warmup"]
                    and r["variant"] == name
                    and r["kind"] == kind
                    and r["code"] == "OK"
                ]
            )
            if len(lat):
                ax.plot(
                    lat,
                    np.arange(1, len(lat) + 1) / len(lat),
                    label=f"{name} (p50 {np.median(lat):.1f} ms)",
                )
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{kind}: cascade over gRPC vs in process")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = out / "grpc_vs_local.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


# ---------------------------------------------------------------------------------------------
# compare batching
@dataclass
class TritonStep:
    config: str
    offered_qps: float
    requests: int
    achieved_qps: float
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    lateness_p99_ms: float
    client_cpu_max: float
    machine_busy_pct: float
    loadavg1: float
    meets: bool
    mean_batch: float
    queue_us: float
    compute_infer_us: float
    request_us: float


def triton_open_step(
    pool: ClientPool,
    server: TritonServer,
    rate: float,
    duration_s: float,
    warmup_s: float,
    n_payloads: int,
    p99_ms: float,
    timeout_s: float,
    rng: np.random.Generator,
    config: str,
) -> TritonStep:
    offsets = poisson_schedule(rate, duration_s, rng)
    payloads = rng.integers(0, n_payloads, len(offsets)).tolist()
    kinds = np.full(len(offsets), KIND_TRITON, np.int8)
    m0, b0 = server.metrics(), cpu_busy_snapshot()
    rec, cpus = pool.open_loop(offsets, payloads, kinds, timeout_s)
    m1, b1 = server.metrics(), cpu_busy_snapshot()
    t_start = float(rec.intended.min() - offsets.min()) if len(rec) else 0.0
    return _triton_step(
        rec, cpus, (t_start + warmup_s, t_start + duration_s), rate, p99_ms, m0, m1, b0, b1, config
    )


def _triton_step(
    rec: Records,
    cpus: list[float],
    window: tuple[float, float],
    rate: float,
    p99_ms: float,
    m0: dict[str, float],
    m1: dict[str, float],
    b0: tuple[float, float],
    b1: tuple[float, float],
    config: str,
) -> TritonStep:
    r = rec.select(rec.intended >= window[0])
    ok = r.code == 0
    lat = r.latency_s[ok] * 1000
    done_in = ((r.done >= window[0]) & (r.done < window[1]) & ok).sum()
    tb = triton_breakdown(m0, m1)
    errors = int((~ok).sum())
    p99 = percentile(lat, 99)
    return TritonStep(
        config=config,
        offered_qps=rate,
        requests=len(r),
        achieved_qps=round(float(done_in) / max(window[1] - window[0], 1e-9), 2),
        errors=errors,
        p50_ms=round(percentile(lat, 50), 3),
        p95_ms=round(percentile(lat, 95), 3),
        p99_ms=round(p99, 3),
        lateness_p99_ms=round(percentile(r.lateness_s, 99) * 1000, 3),
        client_cpu_max=round(max(cpus) if cpus else 0.0, 3),
        machine_busy_pct=round(100.0 * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1e-9), 1),
        loadavg1=round(os.getloadavg()[0], 2),
        # "keeps up": answers (nearly) all it is offered; p99 levels are compared separately
        meets=bool(
            len(r) > 0
            and errors <= 0.01 * len(r)
            and done_in >= 0.9 * len(r)  # answered in the window vs arrivals in it
            and percentile(lat, 50) <= p99_ms
        ),
        mean_batch=tb["mean_batch"],
        queue_us=tb["queue_us"],
        compute_infer_us=tb["compute_infer_us"],
        request_us=tb["request_us"],
    )


def capacity(steps: Sequence[TritonStep]) -> float:
    """Highest achieved throughput among the steps that keep up with their offered load
    (a noisy miss at a lower rate does not hide a higher rate that kept up)."""
    return max((s.achieved_qps for s in steps if s.meets), default=0.0)


def sustained(steps: Sequence[TritonStep], p99_ms: float) -> float:
    """Highest achieved throughput among the steps with p99 <= ``p99_ms`` (and <= 1% errors)
    below the first offered rate that breaks it."""
    best = 0.0
    for s in sorted(steps, key=lambda s: s.offered_qps):
        if not (s.p99_ms <= p99_ms and s.errors <= 0.01 * max(s.requests, 1)):
            break
        best = max(best, s.achieved_qps)
    return best


def throughput_ratio(dynamic: float, none: float) -> float:
    """dynamic / none; inf when only batching met the level, NaN when neither did."""
    if none > 0:
        return dynamic / none
    return math.inf if dynamic > 0 else math.nan


def compare_batching(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    out: Path = args.out / "batching"
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    _print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg']}")
    _print(f"real fine-ranker inputs from {args.payloads} cascade requests …")
    tensors, _ = real_tensors(args.artifacts, args.payloads, args.search_share, args.seed)
    tensors = single_row(tensors)
    np.savez(out / "inputs.npz", *[t for ts in tensors for t in ts])
    rates = [float(x) for x in args.rates.split(",") if x]
    levels = [float(x) for x in str(args.p99_ms).split(",") if x]
    rng = np.random.default_rng(args.seed)
    steps: list[TritonStep] = []
    timeout_s = args.timeout_ms / 1000.0
    with tempfile.TemporaryDirectory(prefix="sluice-batching-") as tmp:
        servers = {
            "dynamic": TritonServer(
                temp_repository(args.artifacts, True, Path(tmp) / "dyn"),
                out / "triton-dynamic.log",
                gpu=args.gpu,
            ),
            "none": TritonServer(
                temp_repository(args.artifacts, False, Path(tmp) / "nodyn"),
                out / "triton-none.log",
                gpu=args.gpu,
            ),
        }
        (out / "config-none.pbtxt").write_text(
            (Path(tmp) / "nodyn" / "fine_ranker" / "config.pbtxt").read_text()
        )
        with contextlib.ExitStack() as stack:
            pools = {}
            for name, srv in servers.items():
                _print(f"starting Triton ({name} batching) …")
                stack.enter_context(srv)
                pools[name] = stack.enter_context(
                    ClientPool(
                        {
                            "kind": "triton",
                            "url": srv.url,
                            "tensors": tensors,
                            "threads": args.threads,
                        },
                        args.clients,
                    )
                )
                pools[name].warm(list(range(20)), 30.0)
            fails = dict.fromkeys(servers, 0)
            for k, rate in enumerate(rates):
                order = list(servers) if k % 2 == 0 else list(servers)[::-1]
                for name in order:
                    if fails[name] >= args.stop_after:
                        continue
                    s = triton_open_step(
                        pools[name],
                        servers[name],
                        rate,
                        args.duration,
                        args.warmup,
                        len(tensors),
                        args.max_p50_ms,
                        timeout_s,
                        rng,
                        name,
                    )
                    steps.append(s)
                    fails[name] += 0 if s.meets else 1
                    _print(
                        f"  {name:<8} {rate:>6g}/s: achieved {s.achieved_qps:7.1f}/s  "
                        f"p50 {s.p50_ms:6.1f}  p99 {s.p99_ms:7.1f} ms  err {s.errors}  "
                        f"batch {s.mean_batch:5.2f}  queue {s.queue_us / 1000:6.1f} ms  "
                        f"infer {s.compute_infer_us / 1000:5.2f} ms/req  "
                        f"late p99 {s.lateness_p99_ms:.1f} ms  cpu {s.machine_busy_pct:.0f}%  "
                        f"load {s.loadavg1:.1f}  {'keeps up' if s.meets else 'SATURATED'}"
                    )
                    time.sleep(args.pause)
                if all(f >= args.stop_after for f in fails.values()):
                    break
    rows = [s.__dict__ for s in steps]
    write_csv(out / "batching.csv", rows, list(rows[0]))
    by_level = []
    for level in levels:
        thr = {name: sustained([s for s in steps if s.config == name], level) for name in servers}
        ratio = throughput_ratio(thr["dynamic"], thr["none"])
        by_level.append(
            {
                "p99_ms": level,
                "dynamic_qps": thr["dynamic"],
                "none_qps": thr["none"],
                "ratio": round(ratio, 3),
                "met": bool(ratio >= 1.5),
            }
        )
    client_ok = all(
        s.lateness_p99_ms <= args.max_lateness_ms and s.client_cpu_max <= 0.8
        for s in steps
        if s.meets
    )
    cap = {name: capacity([s for s in steps if s.config == name]) for name in servers}
    cap_ratio = throughput_ratio(cap["dynamic"], cap["none"])
    summary = {
        "command": _command(argv),
        "machine": info,
        "env": args.env_applied,
        "loadavg_end": os.getloadavg(),
        "p99_levels_ms": levels,
        "by_level": by_level,
        "capacity_qps": cap,
        "capacity_ratio": round(cap_ratio, 3),
        "target_ratio": 1.5,
        "client_ok_on_meeting_steps": client_ok,
        "payloads": len(tensors),
        "clients": args.clients,
        "threads_per_client": args.threads,
    }
    (out / "batching.json").write_text(json.dumps(summary, indent=2, default=str))
    load_end = os.getloadavg()[0]
    figs = plot_batching(
        steps,
        out,
        levels,
        f"{info['cpu']}, {info['cores']} cores, load {info['loadavg'][0]}->{load_end:.1f}",
    )
    _copy(figs, args.figures, "compare-batching")
    for b in by_level:
        _print(
            f"sustained throughput at p99 <= {b['p99_ms']:g} ms: dynamic {b['dynamic_qps']:.1f}/s, "
            f"none {b['none_qps']:.1f}/s: ratio x{b['ratio']:.2f} (target >= x1.5: "
            f"{'MET' if b['met'] else 'NOT MET'})"
        )
    _print(
        f"capacity (keeps up with the offered Poisson load, <= 1% errors, p50 <= "
        f"{args.max_p50_ms:g} ms): dynamic {cap['dynamic']:.1f}/s, none {cap['none']:.1f}/s: "
        f"ratio x{cap_ratio:.2f}"
    )
    if not client_ok:
        _print("note: the client check failed on some steps that kept up")
    return 0


def plot_batching(
    steps: Sequence[TritonStep], out: Path, levels: Sequence[float], title: str
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in (("dynamic", "tab:blue"), ("none", "tab:orange")):
        ss = sorted((s for s in steps if s.config == name), key=lambda s: s.offered_qps)
        x = [s.offered_qps for s in ss]
        ax.plot(x, [s.p99_ms for s in ss], "-o", color=color, ms=3, label=f"{name}: p99")
        ax.plot(x, [s.p50_ms for s in ss], ":", color=color, label=f"{name}: p50")
        ax2.plot(
            x, [s.achieved_qps for s in ss], "-o", color=color, ms=3, label=f"{name}: achieved"
        )
        ax2.plot(
            x,
            [s.mean_batch * 10 for s in ss],
            "--",
            color=color,
            alpha=0.6,
            label=f"{name}: mean batch x10",
        )
    for level in levels:
        ax.axhline(level, color="red", ls="--", lw=0.8, label=f"p99 level {level:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (req/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("fine ranker on Triton: dynamic batching vs none")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    xs = [s.offered_qps for s in steps]
    ax2.plot([min(xs), max(xs)], [min(xs), max(xs)], ":", color="gray", label="offered")
    ax2.set_xlabel("offered load (req/s)")
    ax2.set_ylabel("req/s")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = out / "batching.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


# ---------------------------------------------------------------------------------------------
# compare perf-analyzer
def compare_perf_analyzer(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    out: Path = args.out / "perf_analyzer"
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    _print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg']}")
    binary = ensure_perf_analyzer()
    tensors, _ = real_tensors(args.artifacts, args.payloads, args.search_share, args.seed)
    tensors = single_row(tensors)
    data = perf_analyzer_json(tensors, out / "inputs.json")
    conc = [int(x) for x in args.concurrency.split(",") if x]
    rows: list[dict[str, Any]] = []
    timeout_s = args.timeout_ms / 1000.0
    with tempfile.TemporaryDirectory(prefix="sluice-pa-") as tmp:
        repo = temp_repository(args.artifacts, True, Path(tmp) / "repo")
        with (
            TritonServer(repo, out / "triton.log", gpu=args.gpu) as srv,
            ClientPool(
                {"kind": "triton", "url": srv.url, "tensors": tensors, "threads": max(conc)},
                args.clients,
            ) as pool,
        ):
            pool.warm(list(range(20)), 30.0)
            for k, c in enumerate(conc):
                order = ["perf_analyzer", "sluice"] if k % 2 == 0 else ["sluice", "perf_analyzer"]
                for who in order:
                    m0, l0 = srv.metrics(), os.getloadavg()[0]
                    if who == "perf_analyzer":
                        pa = run_perf_analyzer(
                            binary,
                            srv.url,
                            data,
                            c,
                            out / f"pa_c{c}.csv",
                            args.interval_ms,
                            args.pa_stability,
                        )
                        row = {
                            "client": "perf_analyzer",
                            "concurrency": c,
                            "throughput_qps": pa.get("Inferences/Second", math.nan),
                            "p50_ms": pa.get("p50 latency", math.nan) / 1000,
                            "p90_ms": pa.get("p90 latency", math.nan) / 1000,
                            "p99_ms": pa.get("p99 latency", math.nan) / 1000,
                            "mean_ms": pa.get("Avg latency", math.nan) / 1000,
                            "stable": bool(pa.get("stable", 0)),
                        }
                    else:
                        rec, cpus, t0 = pool.closed_loop(c, args.duration, timeout_s)
                        r = rec.select((rec.intended >= t0 + args.warmup) & (rec.code == 0))
                        lat = r.latency_s * 1000
                        span = args.duration - args.warmup
                        row = {
                            "client": "sluice TritonBackend",
                            "concurrency": c,
                            "throughput_qps": round(len(r) / span, 2),
                            "p50_ms": round(percentile(lat, 50), 3),
                            "p90_ms": round(percentile(lat, 90), 3),
                            "p99_ms": round(percentile(lat, 99), 3),
                            "mean_ms": round(float(lat.mean()), 3) if len(lat) else math.nan,
                            "stable": True,
                            "client_cpu_max": round(max(cpus), 3),
                            "errors": int((rec.code != 0).sum()),
                        }
                    tb = triton_breakdown(m0, srv.metrics())
                    row.update(
                        {
                            "loadavg1": round((l0 + os.getloadavg()[0]) / 2, 2),
                            "mean_batch": tb["mean_batch"],
                            "server_queue_ms": tb["queue_us"] / 1000,
                            "server_infer_ms": tb["compute_infer_us"] / 1000,
                            "server_request_ms": tb["request_us"] / 1000,
                        }
                    )
                    rows.append(row)
                    _print(
                        f"  c={c:<3} {row['client']:<22} {row['throughput_qps']:8.1f}/s  "
                        f"p50 {row['p50_ms']:7.2f}  p99 {row['p99_ms']:7.2f} ms  "
                        f"batch {row['mean_batch']:.2f}  "
                        f"server request {row['server_request_ms']:.2f} ms  "
                        f"load {row['loadavg1']:.1f}"
                        + ("" if row["stable"] else "  (perf_analyzer: not stable)")
                    )
                    time.sleep(args.pause)
    fields = [
        "client",
        "concurrency",
        "throughput_qps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
        "stable",
        "client_cpu_max",
        "errors",
        "loadavg1",
        "mean_batch",
        "server_queue_ms",
        "server_infer_ms",
        "server_request_ms",
    ]
    write_csv(out / "perf_analyzer_vs_sluice.csv", rows, fields)
    ratios = []
    for c in conc:
        a = next(
            (r for r in rows if r["client"] == "perf_analyzer" and r["concurrency"] == c), None
        )
        b = next(
            (r for r in rows if r["client"] != "perf_analyzer" and r["concurrency"] == c), None
        )
        if a and b:
            ratios.append(
                {
                    "concurrency": c,
                    "throughput_sluice_over_pa": round(
                        b["throughput_qps"] / a["throughput_qps"], 3
                    ),
                    "p50_sluice_over_pa": round(b["p50_ms"] / a["p50_ms"], 3),
                    "p99_sluice_over_pa": round(b["p99_ms"] / a["p99_ms"], 3),
                }
            )
    (out / "perf_analyzer.json").write_text(
        json.dumps(
            {
                "command": _command(argv),
                "machine": info,
                "loadavg_end": os.getloadavg(),
                "rows": rows,
                "ratios": ratios,
                "perf_analyzer": str(binary),
            },
            indent=2,
            default=str,
        )
    )
    for rr in ratios:
        _print(
            f"  c={rr['concurrency']}: sluice/perf_analyzer throughput "
            f"x{rr['throughput_sluice_over_pa']}, p50 x{rr['p50_sluice_over_pa']}, "
            f"p99 x{rr['p99_sluice_over_pa']}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# scaling
def add_scale_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--artifacts", required=True, help="comma-separated builds for the catalog-size sweep"
    )
    ap.add_argument(
        "--budgets-artifacts",
        type=Path,
        default=None,
        help="the build for the candidate-budget sweep (default: the largest)",
    )
    ap.add_argument("--recall", default="250,500,1000,2000", help="recall budgets ('' skips)")
    ap.add_argument("--coarse", default="100,200,400", help="coarse keep values ('' skips)")
    ap.add_argument("--rate", type=float, default=20.0, help="offered req/s for each point")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--search-share", type=float, default=0.5)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--timeout-ms", type=float, default=1000.0)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--skip-catalog", action="store_true")
    ap.add_argument("--append", action="store_true", help="add to the points in --out")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for Triton and the services in every point (repeatable)",
    )
    ap.add_argument("--out", type=Path, default=paths.var("bench", "scale"))
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)


def _scale_point(
    artifacts: Path, env: dict[str, str], args: argparse.Namespace, label: str
) -> dict[str, Any]:
    manifest = json.loads((artifacts / "manifest.json").read_text())
    users, words = load_workload(artifacts)
    t = time.monotonic()
    with started_cluster(artifacts, env, args.gpu) as cluster:
        start_s = time.monotonic() - t
        mon = ServiceMonitor(cluster_pids(cluster))
        idle = mon.sample()
        cfg = LoadConfig(
            rates=[args.rate],
            duration_s=args.duration,
            warmup_s=args.warmup,
            search_share=args.search_share,
            clients=args.clients,
            timeout_s=args.timeout_ms / 1000.0,
            seed=args.seed,
            tag=label,
            budgets_ms=dict(DEFAULT_BUDGETS_MS),
        )
        res = run_load(cluster.gateway_address, users, words, cfg, mon, log=_print)
        loaded = mon.sample()
    point: dict[str, Any] = {
        "time": time.strftime("%H:%M:%S"),
        "label": label,
        "artifacts": str(artifacts),
        "num_items": manifest.get("num_items"),
        "env": env,
        "cluster_start_s": round(start_s, 1),
        "build_s": round(sum(manifest.get("timings_s", {}).values()), 1),
        "build_steps_s": manifest.get("timings_s", {}),
    }
    for name, (_, rss, _) in idle.items():
        point[f"rss_idle_{name}_mib"] = round(rss / 2**20, 1)
    for name, (_, rss, _) in loaded.items():
        point[f"rss_loaded_{name}_mib"] = round(rss / 2**20, 1)
    for r in res.rows:
        for key in (
            "p50_ms",
            "p99_ms",
            "achieved_qps",
            "errors",
            "degraded",
            "meets",
            "recall_p50_ms",
            "coarse_p50_ms",
            "fine_p50_ms",
            "rerank_p50_ms",
            "recall_p99_ms",
            "coarse_p99_ms",
            "fine_p99_ms",
            "rerank_p99_ms",
            "loadavg1",
            "machine_busy_pct",
            "client_ok",
        ):
            point[f"{r['kind']}_{key}"] = r[key]
    if res.services:
        for name, u in res.services[-1].items():
            if isinstance(u, dict):
                point[f"cpu_{name}_cores"] = u["cpu_cores"]
                point[f"cpu_ms_per_request_{name}"] = u.get("cpu_ms_per_request")
        point["cpu_ms_per_request_total"] = round(
            sum(
                u.get("cpu_ms_per_request", 0.0)
                for u in res.services[-1].values()
                if isinstance(u, dict)
            ),
            2,
        )
    return point


def scale_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    base_env = apply_env(args.env)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    _print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg']}")
    builds = [Path(p) for p in args.artifacts.split(",") if p]
    points: list[dict[str, Any]] = []
    commands = [_command(argv)]
    if args.append and (args.out / "scale.json").exists():
        previous = json.loads((args.out / "scale.json").read_text())
        points = previous["points"]
        commands = [*previous.get("commands", []), *commands]
        _print(f"appending to {len(points)} points in {args.out}/scale.json")

    def save() -> None:
        keys: list[str] = []
        for p in points:
            keys += [k for k in p if k not in keys and k not in ("env", "build_steps_s")]
        write_csv(args.out / "scale.csv", points, keys)
        (args.out / "scale.json").write_text(
            json.dumps(
                {
                    "commands": commands,
                    "machine": info,
                    "loadavg_end": os.getloadavg(),
                    "points": points,
                },
                indent=2,
                default=str,
            )
        )

    if not args.skip_catalog:
        for b in builds:
            _print(f"== catalog {b} at {args.rate:g} req/s")
            points.append(
                {"sweep": "catalog", **_scale_point(b, dict(base_env), args, f"catalog-{b.name}")}
            )
            save()
    big = args.budgets_artifacts or max(
        builds, key=lambda b: json.loads((b / "manifest.json").read_text()).get("num_items", 0)
    )
    for r in [int(x) for x in args.recall.split(",") if x]:
        env = {
            **base_env,
            "SLUICE_GATEWAY_RECALL_CANDIDATES": str(r),
            "SLUICE_GATEWAY_COARSE_CANDIDATES": str(min(200, r)),
        }
        _print(f"== recall budget {r} (coarse keep {min(200, r)}) on {big.name}")
        points.append(
            {
                "sweep": "recall",
                "recall": r,
                "coarse_keep": min(200, r),
                **_scale_point(big, env, args, f"recall-{r}"),
            }
        )
        save()
    for c in [int(x) for x in args.coarse.split(",") if x]:
        env = {
            **base_env,
            "SLUICE_GATEWAY_RECALL_CANDIDATES": "1000",
            "SLUICE_GATEWAY_COARSE_CANDIDATES": str(c),
        }
        _print(f"== coarse keep {c} (recall 1000) on {big.name}")
        points.append(
            {
                "sweep": "coarse",
                "recall": 1000,
                "coarse_keep": c,
                **_scale_point(big, env, args, f"coarse-{c}"),
            }
        )
        save()
    save()
    figs = plot_scale(
        points, args.out, f"{info['cpu']}, {info['cores']} cores, {args.rate:g} req/s offered"
    )
    _copy(figs, args.figures, "scale")
    _print(f"wrote {args.out}/scale.csv, scale.json")
    return 0


def plot_scale(points: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    cat = sorted((p for p in points if p["sweep"] == "catalog"), key=lambda p: p["num_items"])
    if cat:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        x = [p["num_items"] for p in cat]
        for kind, color in (("recommend", "tab:blue"), ("search", "tab:orange")):
            ax.plot(
                x,
                [p.get(f"{kind}_p99_ms", math.nan) for p in cat],
                "-o",
                color=color,
                label=f"{kind} p99",
            )
            ax.plot(
                x,
                [p.get(f"{kind}_p50_ms", math.nan) for p in cat],
                ":o",
                color=color,
                label=f"{kind} p50",
            )
        ax.set_xscale("log")
        ax.set_xlabel("catalog items")
        ax.set_ylabel("ms")
        ax.set_title("latency vs catalog size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        for name in ("gateway", "recall", "coarse", "fine", "rerank", "triton"):
            ax2.plot(x, [p.get(f"rss_loaded_{name}_mib", math.nan) for p in cat], "-o", label=name)
        ax2.set_xscale("log")
        ax2.set_xlabel("catalog items")
        ax2.set_ylabel("RSS (MiB)")
        ax2.set_title("RSS per service (after the load step)")
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        p = out / "scale_catalog.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)
    sweeps = [s for s in ("recall", "coarse") if any(p["sweep"] == s for p in points)]
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), squeeze=False)
        for ax, s in zip(axes[0], sweeps, strict=True):
            ps = sorted(
                (p for p in points if p["sweep"] == s),
                key=lambda p: p["recall" if s == "recall" else "coarse_keep"],
            )
            x = [p["recall" if s == "recall" else "coarse_keep"] for p in ps]
            for kind, color in (("recommend", "tab:blue"), ("search", "tab:orange")):
                ax.plot(
                    x,
                    [p.get(f"{kind}_p99_ms", math.nan) for p in ps],
                    "-o",
                    color=color,
                    label=f"{kind} p99",
                )
            for stage in ("recall", "coarse", "fine", "rerank"):
                ax.plot(
                    x,
                    [p.get(f"all_{stage}_p50_ms", math.nan) for p in ps],
                    "--",
                    label=f"{stage} p50",
                )
            ax.set_xlabel("recall candidates" if s == "recall" else "coarse keep (= fine input)")
            ax.set_ylabel("ms")
            ax.set_title(f"p99 and stage time vs {s} budget")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        p = out / "scale_budgets.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        figs.append(p)
    return figs


# ---------------------------------------------------------------------------------------------
# CLI
def _copy(paths: Sequence[Path], figures: Path | None, prefix: str) -> None:
    if figures is None:
        return
    figures.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy2(p, figures / f"{prefix}-{p.name}")


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    keys = [
        "kind",
        "variant",
        "n",
        "errors",
        "degraded",
        "p50_ms",
        "p99_ms",
        "recall_p50_ms",
        "coarse_p50_ms",
        "fine_p50_ms",
        "rerank_p50_ms",
    ]
    _print("  ".join(f"{k:>14}" for k in keys))
    for r in rows:
        _print("  ".join(f"{r[k]!s:>14}" for k in keys))


def add_compare_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("what", choices=("grpc", "batching", "perf-analyzer"))
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=paths.var("bench", "compare"))
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-share", type=float, default=0.5)
    ap.add_argument("--gpu", action="store_true", help="Triton with the KIND_GPU config")
    ap.add_argument("--timeout-ms", type=float, default=1000.0)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for Triton and the services (repeatable)",
    )
    g = ap.add_argument_group("grpc")
    g.add_argument("--requests", type=int, default=300)
    g.add_argument("--warmup-requests", type=int, default=20, help="requests discarded first")
    g.add_argument(
        "--grpc-fine",
        default="triton,torch",
        help="fine backends of the gRPC clusters to compare with in-process",
    )
    g.add_argument("--torch-threads", type=int, default=1, help="in-process torch threads")
    b = ap.add_argument_group("batching / perf-analyzer")
    b.add_argument("--payloads", type=int, default=200, help="real requests turned into tensors")
    b.add_argument("--rates", default="25,50,75,100,150,200,250,300,400,500,650,800,1000")
    b.add_argument(
        "--p99-ms",
        default="20,50,100",
        help="p99 levels (ms) at which throughput is compared; the first is the target's",
    )
    b.add_argument(
        "--max-p50-ms",
        type=float,
        default=500.0,
        help="batching: a step whose p50 exceeds this no longer keeps up (stops that config)",
    )
    b.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    b.add_argument("--warmup", type=float, default=1.0, help="seconds cut from each step")
    b.add_argument("--clients", type=int, default=2)
    b.add_argument("--threads", type=int, default=64, help="in-flight calls per client process")
    b.add_argument("--stop-after", type=int, default=2)
    b.add_argument("--max-lateness-ms", type=float, default=5.0)
    b.add_argument("--concurrency", default="1,2,4,8,16,32")
    b.add_argument("--interval-ms", type=int, default=5000, help="perf_analyzer window")
    b.add_argument(
        "--pa-stability",
        type=int,
        default=100,
        help="perf_analyzer --stability-percentage (raise it on a noisy host)",
    )


def compare_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    args.env_applied = apply_env(args.env)
    if args.what == "grpc":
        return compare_grpc(args, argv)
    if args.what == "batching":
        return compare_batching(args, argv)
    return compare_perf_analyzer(args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sluice bench compare")
    add_compare_args(ap)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = ap.parse_args(argv)
    return compare_main(args, ["compare", *argv])


@contextlib.contextmanager
def _noop() -> Iterator[None]:
    yield


if __name__ == "__main__":
    raise SystemExit(main())
