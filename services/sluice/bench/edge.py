"""``sluice bench edge``: what oversized input and a gateway crash cost, seen by the server.

* 10,000 filters in one small Search (120 kB): the gateway's own handling time, from its
  ``sluice_rpc_duration_seconds`` histogram (the client shares the cores);
* a 12 MB Search: refused by gRPC's size limit before parsing;
* kill -9 of the gateway: seconds until a fresh one reports SERVING.
"""

from __future__ import annotations

import argparse
import re
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc

from sluice.bench.load import started_cluster
from sluice.common.v1 import common_pb2
from sluice.v1 import storefront_pb2, storefront_pb2_grpc


def _search_buckets(url: str) -> dict[str, float]:
    """Cumulative counts of the gateway's Search latency histogram, by upper bound."""
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("sluice_rpc_duration_seconds_bucket") and 'method="Search"' in line:
            bound = re.search(r'le="([^"]+)"', line)
            if bound:
                out[bound[1]] = float(line.rsplit(" ", 1)[1])
    return out


def edge_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    with started_cluster(args.artifacts) as cluster:
        url = f"http://127.0.0.1:{cluster.ports.metrics['gateway']}/metrics"
        with grpc.insecure_channel(cluster.gateway_address) as channel:
            stub = storefront_pb2_grpc.StorefrontServiceStub(channel)
            stub.Search(storefront_pb2.SearchRequest(query="shoes", page_size=5), timeout=5)
            many = [common_pb2.AttributeFilter(field="brand", any_of=["b"])] * 10_000
            req = storefront_pb2.SearchRequest(query="shoes", page_size=5, filters=many)
            before = _search_buckets(url)
            codes: set[str] = set()
            for _ in range(args.calls):
                try:
                    stub.Search(req, timeout=5)
                    codes.add("OK")
                except grpc.RpcError as err:
                    codes.add(err.code().name)
            after = _search_buckets(url)
            within = {b: int(after[b] - before.get(b, 0.0)) for b in after}
            print(
                f"10,000 filters ({req.ByteSize():,} bytes), {args.calls} calls, answers "
                f"{sorted(codes)}; server time, calls within: "
                + ", ".join(f"{float(b) * 1000:g} ms: {n}" for b, n in within.items() if n)
            )
            big = storefront_pb2.SearchRequest(query="x" * (12 << 20), page_size=5)
            try:
                stub.Search(big, timeout=5)
                print("12 MB request: accepted (!)")
            except grpc.RpcError as err:
                print(f"12 MB request: {err.code().name} ({err.details()})")
        proc = cluster.processes["gateway"]
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        cluster.start_process("gateway")
        cluster.wait_serving("gateway", 60)
        print(f"gateway SERVING again {time.monotonic() - t0:.2f} s after kill -9 and restart")
    return 0


def add_edge_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=50)
