"""Sharded recall against the whole catalog's, on one build, in this process.

``sluice bench shards --artifacts DIR [--counts 1,2,4] [--index-kind auto]``

For each shard count, the build's recall is cut into that many shards (``sluice shard``,
written into ``DIR/shards``, replacing what is there) and a front over them (the shards in
this process, as ``SLUICE_RECALL_SHARD_ADDRS=local`` loads them) answers the same requests
as one recall engine over the whole build: Recommend for users' histories, and Search for
title words. Reported per count: the overlap of the candidate sets at the budget (1.0:
the same candidates), how many answers were identical (ids, sources and scores), the time to
cut the shards, their index sizes, and recall's in-process latency (whole vs front, the
two alternating request by request). Flat shards must be identical; IVF shards probe other
lists than one IVF index does, and the overlap says how much that costs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.bench.load import command_line, machine_info, percentile


def add_shards_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--counts", default="1,2,4", help="shard counts to compare")
    ap.add_argument("--index-kind", default="auto", help="each shard's FAISS index")
    ap.add_argument("--budget", type=int, default=1000, help="recall candidates per request")
    ap.add_argument("--requests", type=int, default=300, help="requests of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=paths.var("bench", "shards"))


def _requests(artifacts: Any, n: int, seed: int) -> list[Any]:
    from sluice.domain import RankContext
    from sluice.embed.onnx import query_encoder

    rng = np.random.default_rng(seed)
    catalog = artifacts.catalog
    _, histories = artifacts.users()
    users = rng.choice(len(histories), min(n, len(histories)), replace=False)
    ctxs = [
        RankContext(history_item_ids=histories[u], exclude_item_ids=histories[u])
        for u in users
        if len(histories[u])
    ]
    encode = query_encoder(artifacts.root, threads=1).encode
    for row in rng.choice(len(catalog), n, replace=False):
        words = catalog.titles[row].split()
        query = " ".join(words[: 1 + int(rng.integers(min(3, len(words))))])
        ctxs.append(RankContext(query=query, query_embedding=encode([query])[0]))
    return ctxs


def shards_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    from sluice.artifacts import Artifacts
    from sluice.build.shards import write_shards
    from sluice.config import RecallSettings
    from sluice.domain import Budget
    from sluice.recall.loader import load
    from sluice.recall.shards import ShardManifest

    artifacts = Artifacts(args.artifacts)
    info = machine_info()
    whole = load(RecallSettings(artifacts=artifacts.root), [])
    ctxs = _requests(artifacts, args.requests, args.seed)
    budget = args.budget
    results: list[dict[str, Any]] = []
    for count in [int(c) for c in args.counts.split(",")]:
        t0 = time.perf_counter()
        write_shards(artifacts, count, args.index_kind)
        cut_s = time.perf_counter() - t0
        manifest = ShardManifest.load(artifacts.root)
        sizes = [
            sum(f.stat().st_size for f in manifest.shard_dir(artifacts.root, i).rglob("*"))
            for i in range(count)
        ]
        closers: list[Any] = []
        front = load(RecallSettings(artifacts=artifacts.root, shard_addrs="local"), closers)
        overlaps, same, t_whole, t_front = [], 0, [], []
        for ctx in ctxs:
            a0 = time.perf_counter()
            want = whole.retrieve(ctx, Budget(budget))
            a1 = time.perf_counter()
            got = front.retrieve(ctx, Budget(budget))
            a2 = time.perf_counter()
            t_whole.append((a1 - a0) * 1e3)
            t_front.append((a2 - a1) * 1e3)
            if len(want):
                overlaps.append(len(np.intersect1d(want.item_ids, got.item_ids)) / len(want))
            same += bool(
                np.array_equal(want.item_ids, got.item_ids)
                and np.array_equal(want.sources, got.sources)
                and np.array_equal(want.scores, got.scores)
            )
        for close in closers:
            close()
        row = {
            "shards": count,
            "index_kind": args.index_kind,
            "requests": len(ctxs),
            "overlap_mean": round(float(np.mean(overlaps)), 4),
            "overlap_min": round(float(np.min(overlaps)), 4),
            "identical": same,
            "cut_s": round(cut_s, 1),
            "shard_mb": [round(s / 2**20, 1) for s in sizes],
            "whole_p50_ms": round(percentile(np.array(t_whole), 50), 2),
            "whole_p99_ms": round(percentile(np.array(t_whole), 99), 2),
            "front_p50_ms": round(percentile(np.array(t_front), 50), 2),
            "front_p99_ms": round(percentile(np.array(t_front), 99), 2),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "command": command_line(argv),
        "machine": info,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "artifacts": str(args.artifacts),
        "num_items": len(artifacts.catalog),
        "budget": budget,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"shards-{int(time.time())}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0
