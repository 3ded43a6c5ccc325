"""``sluice bench catalog --artifacts DIR``: live catalog updates under storefront load.

One cluster (Triton and the five services as processes, every service following one update
log) serves Search and Recommend at ``--rate`` calls a second from four client threads with
no deadline. Phases alternate: quiet, then with a feed of changes (``--changes`` price and
stock changes a second, in batches of 10, and one new item a second). For each new item, a
probe searches its unique title until the page has it: the time from UpdateItems' reply to
that page is its visibility. Each phase reports the storefront calls' p50, p99 and failures;
the run reports UpdateItems' latency, one call of 1,000 changes, and the visibility figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths

KEY = "bench-catalog-key"


def add_catalog_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=20.0, help="storefront calls a second")
    ap.add_argument("--changes", type=float, default=20.0, help="price/stock changes a second")
    ap.add_argument("--phase-s", type=float, default=30.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=2, help="quiet/feed phase pairs")
    ap.add_argument("--out", type=Path, default=paths.var("bench", "catalog"))


def catalog_main(args: argparse.Namespace, argv: Any = None) -> int:
    import grpc
    from google.protobuf import field_mask_pb2

    from sluice.artifacts import Artifacts
    from sluice.launch import Cluster, Ports
    from sluice.v1 import catalog_pb2, catalog_pb2_grpc, storefront_pb2, storefront_pb2_grpc

    artifacts = Artifacts(args.artifacts)
    users = artifacts.users()[0]
    items = artifacts.catalog.item_ids
    next_id = int(items.max()) + 1
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"rate": args.rate, "changes": args.changes}
    out["loadavg_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sluice-catalog-") as tmp:
        base = Path(tmp)
        cluster = Cluster(
            artifacts=args.artifacts,
            ports=Ports.random(),
            log_dir=base / "logs",
            event_log_dir=base / "events",
            catalog_keys=(KEY,),
        )
        cluster.start(timeout_s=600)
        channel = grpc.insecure_channel(cluster.gateway_address)
        shop = storefront_pb2_grpc.StorefrontServiceStub(channel)
        catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
        auth = (("x-api-key", KEY),)

        def update(updates: list[Any]) -> float:
            t0 = time.perf_counter()
            catalog.UpdateItems(catalog_pb2.UpdateItemsRequest(updates=updates), metadata=auth)
            return (time.perf_counter() - t0) * 1000

        def change(item: int) -> Any:
            if rng.random() < 0.5:
                field = catalog_pb2.CatalogItem(
                    item_id=item, price_cents=int(rng.integers(100, 20_000))
                )
                mask = ["price_cents"]
            else:
                field = catalog_pb2.CatalogItem(item_id=item, in_stock=bool(rng.random() < 0.9))
                mask = ["in_stock"]
            return catalog_pb2.ItemUpdate(
                item=field, update_mask=field_mask_pb2.FieldMask(paths=mask)
            )

        stop = threading.Event()
        calls: list[tuple[float, float, bool]] = []  # started, ms, ok
        lock = threading.Lock()

        def storefront(worker: int) -> None:
            n = 0
            start = time.monotonic()
            while not stop.wait(max(0.0, start + (n * 4 + worker) / args.rate - time.monotonic())):
                n += 1
                user = users[(n * 4 + worker) % len(users)]
                t0 = time.perf_counter()
                ok = True
                try:
                    if n % 2:
                        shop.Search(storefront_pb2.SearchRequest(query="shoes", page_size=10))
                    else:
                        shop.Recommend(storefront_pb2.RecommendRequest(user_id=user, page_size=10))
                except grpc.RpcError:
                    ok = False
                with lock:
                    calls.append((t0, (time.perf_counter() - t0) * 1000, ok))

        update_ms: list[float] = []
        visible_ms: list[float] = []

        def feed(until: float) -> None:
            nonlocal next_id
            tick = 0
            per_batch = 10
            while time.monotonic() < until:
                due = time.monotonic() + per_batch / args.changes
                picked = rng.choice(items, per_batch, replace=False)
                update_ms.append(update([change(int(i)) for i in picked]))
                tick += 1
                if tick % max(1, round(args.changes / per_batch)) == 0:  # one new item a second
                    item, word = next_id, f"zq{next_id}x"
                    next_id += 1
                    new = catalog_pb2.CatalogItem(
                        item_id=item, title=f"{word} lamp", price_cents=999, in_stock=True
                    )
                    update_ms.append(update([catalog_pb2.ItemUpdate(item=new)]))
                    t0 = time.perf_counter()
                    request = storefront_pb2.SearchRequest(query=word, page_size=5)
                    while item not in shop.Search(request).page.item_ids:
                        if time.perf_counter() - t0 > 30:
                            raise TimeoutError(f"new item {item} not searchable in 30 s")
                    visible_ms.append((time.perf_counter() - t0) * 1000)
                time.sleep(max(0.0, due - time.monotonic()))

        threads = [threading.Thread(target=storefront, args=(w,), daemon=True) for w in range(4)]
        phases: list[dict[str, Any]] = []
        try:
            for t in threads:
                t.start()
            time.sleep(5)  # warm-up: every process has answered a few calls
            for r in range(args.rounds):
                for fed in (False, True):
                    begin = time.perf_counter()
                    until = time.monotonic() + args.phase_s
                    if fed:
                        feed(until)
                    else:
                        stop.wait(args.phase_s)
                    end = time.perf_counter()
                    with lock:
                        mine = [c for c in calls if begin <= c[0] < end]
                    ms = [c[1] for c in mine]
                    phases.append(
                        {
                            "round": r,
                            "feed": fed,
                            "calls": len(mine),
                            "failed": sum(not c[2] for c in mine),
                            "p50_ms": float(np.percentile(ms, 50)),
                            "p99_ms": float(np.percentile(ms, 99)),
                        }
                    )
                    print(json.dumps(phases[-1]), flush=True)
            bulk = [change(int(i)) for i in rng.choice(items, min(1000, len(items)), replace=False)]
            out["bulk_1000_ms"] = update(bulk)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            cluster.stop()
    quiet = [p for p in phases if not p["feed"]]
    fed_phases = [p for p in phases if p["feed"]]
    out |= {
        "phases": phases,
        "failed": sum(p["failed"] for p in phases),
        "p99_quiet_ms": float(np.median([p["p99_ms"] for p in quiet])),
        "p99_feed_ms": float(np.median([p["p99_ms"] for p in fed_phases])),
        "p50_quiet_ms": float(np.median([p["p50_ms"] for p in quiet])),
        "p50_feed_ms": float(np.median([p["p50_ms"] for p in fed_phases])),
        "update_p50_ms": float(np.percentile(update_ms, 50)),
        "update_p99_ms": float(np.percentile(update_ms, 99)),
        "new_items": len(visible_ms),
        "visible_p50_ms": float(np.percentile(visible_ms, 50)),
        "visible_max_ms": float(np.max(visible_ms)),
        "loadavg_end": os.getloadavg(),
    }
    print(
        f"{out['failed']} failed storefront calls; p50/p99 quiet {out['p50_quiet_ms']:.1f}/"
        f"{out['p99_quiet_ms']:.1f} ms, with the feed {out['p50_feed_ms']:.1f}/"
        f"{out['p99_feed_ms']:.1f} ms; UpdateItems p50 {out['update_p50_ms']:.1f} ms, p99 "
        f"{out['update_p99_ms']:.1f} ms, 1,000 changes {out['bulk_1000_ms']:.0f} ms; "
        f"{out['new_items']} new items searchable after p50 {out['visible_p50_ms']:.0f} ms, "
        f"max {out['visible_max_ms']:.0f} ms; load average {out['loadavg_start'][0]:.2f} → "
        f"{out['loadavg_end'][0]:.2f}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "catalog.json").write_text(json.dumps(out, indent=1))
    return 0
