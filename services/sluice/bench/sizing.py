"""A sizing table for larger catalogs, derived from one measured sharded build and load run.

``python -m sluice.bench.sizing --artifacts DIR --load DIR/load.json [--items 10000000,100000000]``

What is measured comes from two files:

* the build (``sluice build --shards N``): bytes per item of each shard's parts (ANN
  indexes, BM25, catalog slice), and of the parts every shard holds over the whole catalog
  (co-occurrence rows of every seed, the id column and the behaviour vectors it reads the
  user's seeds from);
* a load run over that build (``sluice bench load --start --recall-shards N``): CPU
  milliseconds per answered request of every process at one offered rate.

What is assumed is printed with the table (``--items-per-shard``, ``--node-memory-gib``,
``--node-cores``, ``--utilization``): a shard's own parts grow with its items; its
whole-catalog parts with the catalog. Every process but the shards costs the same CPU per
request whatever the catalog's size. A shard's CPU per request is its measured cost, split
into a fixed part (gRPC, conversion) and its engine's work; the engine's work is timed in
this process on the same requests for one shard and for the whole build, and extrapolated
along the line through those two sizes (``--engine-requests``; 0 scales the whole measured
cost linearly with the shard's items instead, an upper bound).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sluice.recall.shards import ShardManifest

GIB = 2**30
ITEM_ID_BYTES = 8 + 8  # the id column and RowIndex's id -> row table


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def measured_bytes(artifacts: Path) -> dict[str, float]:
    """Bytes per item of each shard part, averaged over the build's shards."""
    manifest = ShardManifest.load(artifacts)
    n = manifest.num_items
    parts = {"behaviour index": 0, "text index": 0, "BM25": 0, "catalog slice": 0}
    cooc = 0
    for index in range(manifest.count):
        folder = manifest.shard_dir(artifacts, index)
        parts["behaviour index"] += _size(folder / "behaviour.faiss")
        parts["text index"] += _size(folder / "text.faiss")
        parts["BM25"] += _size(folder / "lexical")
        parts["catalog slice"] += _size(folder / "catalog.npz") + _size(
            folder / "catalog_text.json"
        )
        cooc += _size(folder / "cooc.npz")
    own = {k: v / n for k, v in parts.items()}  # all shards together hold each item once
    dim = 64
    vectors = artifacts / "behaviour_vectors.npy"
    if vectors.exists():
        dim = _size(vectors) // max(n, 1) // 4
    whole = {
        "co-occurrence of every seed": cooc / manifest.count / n,
        "seed ids": float(ITEM_ID_BYTES),
        "seed behaviour vectors (mmap, shared per node)": 4.0 * dim,
    }
    return {
        **{f"own: {k}": v for k, v in own.items()},
        **{f"whole: {k}": v for k, v in whole.items()},
    }


def cpu_per_request(load_json: Path, rate: float | None) -> tuple[float, dict[str, float]]:
    """The offered rate and each process's CPU ms per answered request at that step."""
    data = json.loads(load_json.read_text())
    steps = data["services"]
    step = steps[0] if rate is None else next(s for s in steps if s["offered_qps"] == rate)
    per = {
        name: float(u["cpu_ms_per_request"])
        for name, u in step.items()
        if isinstance(u, dict) and "cpu_ms_per_request" in u
    }
    return float(step["offered_qps"]), per


def engine_times(artifacts: Path, requests: int, seed: int = 0) -> tuple[float, float, int, int]:
    """Mean CPU milliseconds, in process, of shard 0's engine and of the whole build's engine on
    the same requests (Recommend and Search, as ``sluice bench shards`` draws them), with
    the items of each."""
    import time

    import faiss
    import numpy as np

    from sluice.artifacts import Artifacts
    from sluice.bench.shards import _requests
    from sluice.domain import Budget
    from sluice.recall.engine import RecallAssets, RecallEngine
    from sluice.recall.shards import SOURCE_LISTS, ShardEngine, shard_assets

    faiss.omp_set_num_threads(1)  # process time is then the work, not OpenMP's spinning
    a = Artifacts(artifacts)
    whole = RecallEngine(RecallAssets.from_artifacts(a))
    shard = ShardEngine(RecallEngine(shard_assets(a, 0)))
    ctxs = _requests(a, requests, seed)
    for ctx in ctxs[:5]:  # first calls (page faults, FAISS set-up) are not counted
        shard.retrieve(ctx, Budget(1000 * SOURCE_LISTS))
        whole.retrieve(ctx, Budget(1000))
    t_shard, t_whole = [], []
    for ctx in ctxs:  # CPU time of this process, alternating: robust to a busy machine
        t0 = time.process_time()
        shard.retrieve(ctx, Budget(1000 * SOURCE_LISTS))  # a front's ask for a 1,000 budget
        t1 = time.process_time()
        whole.retrieve(ctx, Budget(1000))
        t_whole.append((time.process_time() - t1) * 1e3)
        t_shard.append((t1 - t0) * 1e3)
    return float(np.mean(t_shard)), float(np.mean(t_whole)), shard.catalog_size, len(a.catalog)


def plan(
    bytes_per_item: dict[str, float],
    cpu: dict[str, float],
    measured_shard_items: int,
    items: int,
    items_per_shard: int,
    node_memory_gib: float,
    node_cores: int,
    utilization: float,
    rates: Sequence[float],
    engine: tuple[float, float, int, int] | None = None,
) -> dict[str, Any]:
    """One catalog size's row: shards, memory per shard, shards per node, CPU and replicas.

    ``engine``: :func:`engine_times` on the measured build; without it a shard's whole CPU
    per request grows linearly with its items."""
    shards = max(1, math.ceil(items / items_per_shard))
    per_shard = items / shards
    own = sum(v for k, v in bytes_per_item.items() if k.startswith("own:")) * per_shard
    whole_private = sum(
        v for k, v in bytes_per_item.items() if k.startswith("whole:") and "mmap" not in k
    )
    whole_shared = sum(v for k, v in bytes_per_item.items() if "mmap" in k) * items
    shard_gib = (own + whole_private * items) / GIB
    shared_gib = whole_shared / GIB
    # memory decides how many shards a node holds (the shared table once per node)
    by_memory = max(0, math.floor((0.8 * node_memory_gib - shared_gib) / max(shard_gib, 1e-9)))
    shard_names = [k for k in cpu if k.startswith("shard")]
    measured = sum(cpu[k] for k in shard_names) / len(shard_names) if shard_names else 0.0
    if engine is None:
        shard_cpu = measured * per_shard / measured_shard_items
    else:  # the fixed part as measured, the engine's work along the line of its two sizes
        t_shard, t_whole, n_shard, n_whole = engine
        slope = (t_whole - t_shard) / max(n_whole - n_shard, 1)  # ms per item
        shard_cpu = max(measured - t_shard, 0.0) + max(t_shard + slope * (per_shard - n_shard), 0)
    other_cpu = sum(v for k, v in cpu.items() if k not in shard_names)
    total_ms = other_cpu + shards * shard_cpu
    replicas = {}
    for rate in rates:
        cores = rate * total_ms / 1000 / utilization
        shard_cores = rate * shard_cpu / 1000 / utilization  # per shard
        replicas[f"{rate:g}"] = {
            "cores": math.ceil(cores),
            "nodes": math.ceil(cores / node_cores),
            "replicas_per_shard": max(2, math.ceil(shard_cores / 2)),  # 2-core shard replicas
        }
    return {
        "items": items,
        "shards": shards,
        "items_per_shard": round(per_shard),
        "shard_gib": round(shard_gib, 2),
        "shared_per_node_gib": round(shared_gib, 2),
        "shards_per_node_by_memory": by_memory,
        "shard_cpu_ms": round(shard_cpu, 2),
        "shard_cpu_model": "linear in items" if engine is None else "fixed + engine line",
        "cpu_ms_per_request": round(total_ms, 1),
        "replicas": replicas,
    }


def markdown(rows: Sequence[dict[str, Any]], rates: Sequence[float]) -> str:
    head = (
        "| items | shards x items | memory per shard (GiB) | shared per node (GiB) "
        "| shards per node (memory) | CPU ms/request | "
        + " | ".join(f"{r:g} req/s: cores, nodes, replicas per shard" for r in rates)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + len(rates))]
    for r in rows:
        cells = [
            f"{r['items']:,}",
            f"{r['shards']} x {r['items_per_shard']:,}",
            f"{r['shard_gib']:.2f}",
            f"{r['shared_per_node_gib']:.2f}",
            str(r["shards_per_node_by_memory"]),
            f"{r['cpu_ms_per_request']:.1f}",
        ]
        for rate in rates:
            x = r["replicas"][f"{rate:g}"]
            cells.append(f"{x['cores']}, {x['nodes']}, {x['replicas_per_shard']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sluice.bench.sizing", description=__doc__)
    ap.add_argument("--artifacts", type=Path, required=True, help="a sharded build")
    ap.add_argument("--load", type=Path, required=True, help="load.json of a run over it")
    ap.add_argument("--rate", type=float, default=None, help="its step (default: the first)")
    ap.add_argument("--items", default="10000000,100000000", help="catalog sizes to plan")
    ap.add_argument("--items-per-shard", type=int, default=2_500_000)
    ap.add_argument("--node-memory-gib", type=float, default=64.0)
    ap.add_argument("--node-cores", type=int, default=16)
    ap.add_argument("--utilization", type=float, default=0.6, help="target CPU utilization")
    ap.add_argument("--rates", default="1000,10000", help="req/s to plan for")
    ap.add_argument(
        "--engine-requests",
        type=int,
        default=100,
        help="requests of each kind timed in process on shard 0 and the whole build (0: none)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    manifest = ShardManifest.load(args.artifacts)
    measured = measured_bytes(args.artifacts)
    rate, cpu = cpu_per_request(args.load, args.rate)
    rates = [float(x) for x in args.rates.split(",")]
    engine = engine_times(args.artifacts, args.engine_requests) if args.engine_requests else None
    if engine is not None:
        print(
            f"recall engine in process: shard of {engine[2]:,} items {engine[0]:.2f} ms, "
            f"whole {engine[3]:,} items {engine[1]:.2f} ms (mean CPU per request)"
        )
    rows = [
        plan(
            measured,
            cpu,
            manifest.num_items // manifest.count,
            int(items),
            args.items_per_shard,
            args.node_memory_gib,
            args.node_cores,
            args.utilization,
            rates,
            engine,
        )
        for items in args.items.split(",")
    ]
    print(f"measured on {manifest.num_items:,} items in {manifest.count} shards")
    print("bytes per item: " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))
    print(
        f"CPU ms per request at {rate:g} req/s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    )
    print(markdown(rows, rates))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "bytes_per_item": measured,
                    "cpu": cpu,
                    "rate": rate,
                    "engine_ms": engine,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
