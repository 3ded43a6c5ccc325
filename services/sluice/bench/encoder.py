"""The gateway's query encoder: sentence-transformers (eager torch) vs the ONNX Runtime export.

``sluice bench encoder --artifacts DIR``

Both encoders run all-MiniLM-L6-v2 in this process on the same thread count. Queries are drawn
as the load benchmark draws them (1 to 3 consecutive words of a random catalog title) and each
is encoded alone, as the gateway does on a cache miss; the two encoders alternate query by
query so that machine noise hits both alike. Reported: wall and CPU ms per query
(p50/p99/mean), titles per second in batches of 128, and the cosine between the two encoders'
vectors (they should agree to float error).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sluice import paths
from sluice.bench.load import (
    command_line,
    machine_info,
    make_requests,
    percentile,
    title_words,
)


def add_encoder_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--queries", type=int, default=400, help="single-query encodings per encoder")
    ap.add_argument("--titles", type=int, default=2000, help="titles for the batch throughput")
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=paths.var("bench", "encoder"))


def encoder_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import torch

    from sluice.artifacts import Artifacts
    from sluice.embed.onnx import ONNX_FILE, OnnxMiniLMEncoder, export_onnx
    from sluice.embed.text import MiniLMEncoder, TextEncoder

    torch.set_num_threads(args.threads)
    a = Artifacts(args.artifacts)
    titles = list(a.catalog.titles)
    path = a.root / ONNX_FILE
    with tempfile.TemporaryDirectory() as tmp:
        if not path.exists():
            print(f"{path} is missing (an older build): exporting to a temporary file", flush=True)
            path = export_onnx(Path(tmp) / ONNX_FILE)
        encoders: dict[str, TextEncoder] = {
            "sentence-transformers": MiniLMEncoder(device="cpu", threads=args.threads),
            "onnxruntime": OnnxMiniLMEncoder(path, threads=args.threads),
        }
        # the load benchmark's Search queries (search_share 1.0; no users needed)
        drawn = make_requests(
            args.queries, 1.0, [], title_words(titles), np.random.default_rng(args.seed)
        )
        queries = [r.query for r in drawn]
        for enc in encoders.values():  # warm both
            for q in queries[:20]:
                enc.encode([q])
        wall: dict[str, list[float]] = {k: [] for k in encoders}
        cpu: dict[str, float] = dict.fromkeys(encoders, 0.0)
        vectors: dict[str, list[np.ndarray]] = {k: [] for k in encoders}
        for q in queries:
            for name, enc in encoders.items():
                t, c = time.perf_counter(), time.process_time()
                vectors[name].append(enc.encode([q])[0])
                wall[name].append((time.perf_counter() - t) * 1e3)
                cpu[name] += time.process_time() - c
        batch = titles[: args.titles]
        throughput = {}
        for name, enc in encoders.items():
            t = time.perf_counter()
            enc.encode(batch, batch_size=128)
            throughput[name] = len(batch) / (time.perf_counter() - t)
    st, ox = (np.stack(vectors[k]) for k in encoders)
    cosine = (st * ox).sum(axis=1)
    rows = {}
    for name in encoders:
        w = np.asarray(wall[name])
        rows[name] = {
            "p50_ms": round(percentile(w, 50), 2),
            "p99_ms": round(percentile(w, 99), 2),
            "mean_ms": round(float(w.mean()), 2),
            "cpu_ms_per_query": round(cpu[name] / len(queries) * 1e3, 2),
            "titles_per_s_batch128": round(throughput[name], 1),
        }
        print(
            f"{name:>22}: query p50 {rows[name]['p50_ms']} ms, p99 {rows[name]['p99_ms']} ms, "
            f"mean {rows[name]['mean_ms']} ms, CPU {rows[name]['cpu_ms_per_query']} ms; "
            f"{rows[name]['titles_per_s_batch128']} titles/s in batches",
            flush=True,
        )
    names = list(encoders)
    speedup = rows[names[0]]["mean_ms"] / rows[names[1]]["mean_ms"]
    print(
        f"onnxruntime is x{speedup:.2f} faster per query; cosine between the two: "
        f"min {cosine.min():.6f}, mean {cosine.mean():.6f} over {len(queries)} queries",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command_line(argv),
        "machine": machine_info(),
        "threads": args.threads,
        "queries": len(queries),
        "encoders": rows,
        "speedup_mean": round(speedup, 2),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }
    (args.out / "encoder.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'encoder.json'}", flush=True)
    return 0
