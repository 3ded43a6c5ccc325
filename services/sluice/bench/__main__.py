"""``python -m sluice.bench`` / ``sluice bench``: the serving benchmarks.

    sluice bench load     --start --artifacts DIR [--rates 10,20,50]  open-loop Poisson load
    sluice bench overload --artifacts DIR                             2x saturation: shedding
    sluice bench edge     --artifacts DIR                             10k filters, 12 MB, restart
    sluice bench scale    --artifacts DIR[,DIR…]                      p99/RSS vs catalog and budgets
    sluice bench compare  grpc|batching|perf-analyzer --artifacts DIR side-by-side ratios
    sluice bench flops    --artifacts DIR                             matmul peak vs the ranker
    sluice bench encoder  --artifacts DIR                             query encoder: torch vs ONNX
    sluice bench shards   --artifacts DIR [--counts 1,2,4]            sharded vs whole recall
    sluice bench shadow   --artifacts DIR                             latency with a shadow arm
    sluice bench catalog  --artifacts DIR                             catalog updates under load

The ANN index comparison is ``python -m sluice.bench.ann`` (its own module).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from sluice.bench import (
        catalog,
        compare,
        edge,
        encoder,
        flops,
        load,
        overload,
        shadow,
        shards,
    )

    ap = parser or argparse.ArgumentParser(prog="sluice bench", description=__doc__)
    sub = ap.add_subparsers(dest="bench", required=True)
    lp = sub.add_parser("load", help="open-loop Poisson load against the gateway")
    load.add_load_args(lp)
    lp.set_defaults(bench_fn=load.load_main)
    op = sub.add_parser("overload", help="2x the saturation rate: admission control holds?")
    overload.add_overload_args(op)
    op.set_defaults(bench_fn=overload.overload_main)
    gp = sub.add_parser("edge", help="oversized input and a gateway crash, server-side")
    edge.add_edge_args(gp)
    gp.set_defaults(bench_fn=edge.edge_main)
    sp = sub.add_parser("scale", help="p99, RSS and build time vs catalog size and budgets")
    compare.add_scale_args(sp)
    sp.set_defaults(bench_fn=compare.scale_main)
    cp = sub.add_parser("compare", help="gRPC vs in-process; dynamic batching; perf_analyzer")
    compare.add_compare_args(cp)
    cp.set_defaults(bench_fn=compare.compare_main)
    fp = sub.add_parser("flops", help="matmul FLOP/s vs the fine ranker's achieved FLOP/s")
    flops.add_flops_args(fp)
    fp.set_defaults(bench_fn=flops.flops_main)
    ep = sub.add_parser("encoder", help="query encoding: sentence-transformers vs ONNX Runtime")
    encoder.add_encoder_args(ep)
    ep.set_defaults(bench_fn=encoder.encoder_main)
    hp = sub.add_parser("shards", help="sharded recall vs the whole catalog's: overlap, latency")
    shards.add_shards_args(hp)
    hp.set_defaults(bench_fn=shards.shards_main)
    wp = sub.add_parser("shadow", help="Recommend latency with and without a shadow arm")
    shadow.add_shadow_args(wp)
    wp.set_defaults(bench_fn=shadow.shadow_main)
    up = sub.add_parser("catalog", help="live catalog updates under storefront load")
    catalog.add_catalog_args(up)
    up.set_defaults(bench_fn=catalog.catalog_main)
    return ap


def _reexec_with_env(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """``--env KEY=VALUE`` must hold from the start: OpenBLAS and libgomp read their
    variables once, when numpy/torch load (already the case here). Re-run this command in a
    fresh interpreter with them set, once."""
    pairs = [p.partition("=") for p in getattr(args, "env", None) or []]
    wanted = {k: v for k, sep, v in pairs if sep}
    if argv is None or not wanted or all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    if os.environ.get("SLUICE_BENCH_REEXEC") == "1":
        return  # never loop
    os.environ.update(wanted)
    os.environ["SLUICE_BENCH_REEXEC"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "sluice.bench", *argv])


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    _reexec_with_env(args, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sluice.launch import stop_clusters_on_signals

    stop_clusters_on_signals()
    result: int = args.bench_fn(args, argv)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
