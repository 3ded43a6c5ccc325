"""The cost round's small benchmarks (docs/benchmarks.md, "The cost round against 8eb4a55").

``python -m sluice.bench.hotpath cpu ARTIFACTS --requests 600 --name new``
    CPU per request (``time.process_time``) of the in-process cascade, ``Gateway`` over the
    four stages with the torch ranker (:func:`sluice.bench.compare.local_gateway`), for a
    fixed request set (half Search), after 100 warm-up requests. Run it from two checkouts
    in turn to compare them on the same artifacts.
``python -m sluice.bench.hotpath pages ARTIFACTS FILE --requests 600``
    Writes every page (ids and scores) of a fixed request set to ``FILE``, or, when ``FILE``
    exists, compares the pages with it: a rewrite that claims to change nothing must print
    ``identical pages N/N``. For a change that may move results, it also prints how many
    pages keep the same ids in the same order, and the mean share of a page's ids kept.
``python -m sluice.bench.hotpath encoder ARTIFACTS --queries 600``
    The fp32 and int8 query encoders side by side on the same queries: CPU per query and
    the cosine between their vectors.
``python -m sluice.bench.hotpath ann ARTIFACTS --kinds ivf_flat,ivf_fp16,ivf_rabitq``
    The recall stage's two ANN indexes as served (top 1,000, the history excluded) built
    as each kind from the build's vectors: CPU per query, alternating kinds, and recall@1000
    against exact search. Queries are the recall stage's own: users' recency-weighted
    history vectors for the behaviour index, encoded benchmark queries for the text index.
``python -m sluice.bench.hotpath rtt [--server sync|aio]``
    Client CPU and wall time of a gRPC round trip to a health service in another process,
    made blocking, with ``.future()`` (what the gateway's stage calls use, so that a
    cancelled request cancels the call in flight), with ``.future()`` while a watch keeps
    the channel's thread alive (``gateway.stages.SpinKeeper``), and from a ``grpc.aio``
    client; the server is the sync bootstrap's kind or ``grpc.aio``. Both sides run with
    the services' grpcio settings (:mod:`sluice.grpc_env`); ``GRPC_EXPERIMENTS= python -m
    sluice.bench.hotpath rtt`` measures grpcio's own defaults.
``python -m sluice.bench.hotpath stage ARTIFACTS --stage coarse --requests 600``
    One stage's engine in process, replaying the calls the in-process cascade made to it
    for a fixed request set (page size 10): CPU per call, best and median of five rounds.
    Run it from two checkouts in turn to compare one stage's cost.
``python -m sluice.bench.hotpath hop ARTIFACTS --stage rerank --requests 300``
    Where one stage hop's cost goes. The calls the in-process cascade makes to the stage for
    a fixed request set are replayed, alternating: to the engine in this process, over gRPC
    to ``sluice serve <stage>`` on the same build (the fine stage with the same torch
    ranker), and as health checks to that server (the bare hop). Per call: wall time, this
    process's and the server's CPU, and both sides' context switches. The answers must be
    identical both ways; the count is printed.
``python -m sluice.bench.hotpath served ARTIFACTS --requests 600``
    What serving adds to the one-machine layout without concurrency. A fixed request set
    (half Search) goes, one request at a time and alternating by round, to the in-process
    cascade (as ``cpu``) and to ``sluice up --stages local`` on the same build with the
    same torch ranker in the gateway (no Triton; ``--pin-cpus``: the gateway on a core of
    its own, this process on the others). Per request: the gateway's CPU and context
    switches, this client's CPU, and wall time. The first pages must be the same both
    ways (the same ids, scores equal to 1e-6); the count is printed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import grpc_env  # noqa: F401  (before grpc loads, as in the services)


def _requests(artifacts: Path, n: int, seed: int, search_share: float = 0.5) -> list[Any]:
    from sluice.bench.load import load_workload, make_requests

    users, words = load_workload(artifacts)
    return make_requests(n, search_share, users, words, np.random.default_rng(seed))


def _caller(gateway: Any, page_size: int) -> Callable[[Any], Any]:
    from sluice.bench.load import KIND_SEARCH

    def call(spec: Any) -> Any:
        if spec.kind == KIND_SEARCH:
            return gateway.search(
                query=spec.query, user_id=spec.user_id, page_size=page_size, deadline_s=30.0
            )
        return gateway.recommend(user_id=spec.user_id, page_size=page_size, deadline_s=30.0)

    return call


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    from sluice.bench.compare import local_gateway
    from sluice.bench.load import KIND_SEARCH

    call = _caller(local_gateway(args.artifacts), 10)
    specs = _requests(args.artifacts, args.requests + 100, args.seed)
    for spec in specs[:100]:
        call(spec)
    if args.freeze:  # as a service process does once warm (sluice.core.heap)
        gc.collect()
        gc.freeze()
    spent: dict[str, list[float]] = {"search": [], "recommend": []}
    for spec in specs[100:]:
        t0 = time.process_time()
        call(spec)
        kind = "search" if spec.kind == KIND_SEARCH else "recommend"
        spent[kind].append(time.process_time() - t0)
    out = {
        "name": args.name,
        "requests": args.requests,
        "all_ms": 1000 * sum(map(sum, spent.values())) / args.requests,
        **{f"{k}_ms": 1000 * float(np.mean(v)) if v else float("nan") for k, v in spent.items()},
    }
    print(
        f"{args.name}: {out['all_ms']:.2f} ms of CPU per request (Search {out['search_ms']:.2f}, "
        f"Recommend {out['recommend_ms']:.2f}; {args.requests} requests)"
    )
    return out


def pages(args: argparse.Namespace) -> dict[str, Any]:
    from sluice.bench.compare import local_gateway

    call = _caller(local_gateway(args.artifacts), 50)
    got = []
    for spec in _requests(args.artifacts, args.requests, args.seed):
        page = call(spec)
        got.append(
            {
                "ids": page.candidates.item_ids.tolist(),
                "scores": [round(float(s), 5) for s in page.candidates.scores],
            }
        )
    if not args.file.exists():
        args.file.write_text(json.dumps(got))
        print(f"wrote {len(got)} pages to {args.file}")
        return {"written": len(got)}
    before = json.loads(args.file.read_text())
    pairs = list(zip(before, got, strict=True))
    same = sum(a == b for a, b in pairs)
    same_ids = sum(a["ids"] == b["ids"] for a, b in pairs)
    # a change that may move results (an approximate index): how much of each page stays
    overlap = float(
        np.mean([len(set(a["ids"]) & set(b["ids"])) / max(1, len(a["ids"])) for a, b in pairs])
    )
    print(
        f"identical pages {same}/{len(got)} (ids and scores to 5 decimals); the same ids in "
        f"the same order {same_ids}/{len(got)}; mean share of a page's ids kept {overlap:.4f}"
    )
    return {"identical": same, "same_ids": same_ids, "overlap": overlap, "pages": len(got)}


def encoder(args: argparse.Namespace) -> dict[str, Any]:
    from sluice.embed.onnx import query_encoder

    fp32 = query_encoder(args.artifacts)
    int8 = query_encoder(args.artifacts, precision="int8")
    queries = [s.query for s in _requests(args.artifacts, args.queries, args.seed, 1.0)]
    spent = {"fp32": 0.0, "int8": 0.0}
    cosines = []
    for q in queries:  # interleaved, so that the host's load hits both alike
        t0 = time.process_time()
        a = fp32.encode([q])[0]
        t1 = time.process_time()
        b = int8.encode([q])[0]
        spent["fp32"] += t1 - t0
        spent["int8"] += time.process_time() - t1
        cosines.append(float(a @ b))
    out = {
        "fp32_ms": 1000 * spent["fp32"] / len(queries),
        "int8_ms": 1000 * spent["int8"] / len(queries),
        "cosine_mean": float(np.mean(cosines)),
        "cosine_min": float(np.min(cosines)),
    }
    print(
        f"per query: fp32 {out['fp32_ms']:.2f} ms, int8 {out['int8_ms']:.2f} ms "
        f"({out['int8_ms'] / out['fp32_ms']:.2f}x); cosine mean {out['cosine_mean']:.4f}, "
        f"min {out['cosine_min']:.4f}"
    )
    return out


def ann(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from sluice.artifacts import Artifacts
    from sluice.domain import RankContext
    from sluice.embed.onnx import query_encoder
    from sluice.recall.ann_index import AnnIndex, build_index
    from sluice.recall.engine import RecallConfig
    from sluice.recall.sources import seed_rows

    faiss.omp_set_num_threads(1)  # as the recall service searches: one query, one thread
    a = Artifacts(args.artifacts)
    catalog, cfg = a.catalog, RecallConfig()
    rng = np.random.default_rng(args.seed)
    users, histories = a.users()
    queries: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"behaviour": [], "text": []}
    for u in rng.choice(len(users), size=min(args.queries, len(users)), replace=False):
        ctx = RankContext(history_item_ids=histories[u])
        seeds, weights = seed_rows(catalog, ctx, cfg.history_window, cfg.recency_decay)
        if len(seeds):
            allowed = np.ones(len(catalog), bool)
            allowed[catalog.rows(histories[u])] = False  # recall excludes the history
            queries["behaviour"].append((weights @ a.behaviour_vectors[seeds], allowed))
    encoder = query_encoder(args.artifacts, precision="int8")
    texts = [s.query for s in _requests(args.artifacts, args.queries, args.seed, 1.0)]
    for vector in encoder.encode(texts):
        queries["text"].append((vector, np.ones(len(catalog), bool)))
    out: dict[str, Any] = {}
    for name, vectors in (("behaviour", a.behaviour_vectors), ("text", a.text_vectors)):
        qs = [
            ((q / np.linalg.norm(q)).reshape(1, -1).astype(np.float32), ok)
            for q, ok in queries[name]
        ]
        exact = AnnIndex(build_index(vectors, "flat"))
        truth = [exact.search_filtered(q, 1000, ok)[1][0] for q, ok in qs]
        indexes = {kind: AnnIndex(build_index(vectors, kind)) for kind in args.kinds.split(",")}
        spent = dict.fromkeys(indexes, 0.0)
        for _ in range(args.rounds):  # alternating, so that the host's load hits each alike
            for kind, index in indexes.items():
                t0 = time.process_time()
                for q, ok in qs:
                    index.search_filtered(q, 1000, ok)
                spent[kind] += time.process_time() - t0
        for kind, index in indexes.items():
            found = [index.search_filtered(q, 1000, ok)[1][0] for q, ok in qs]
            kept = [len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]
            row = {
                "ms_per_query": 1000 * spent[kind] / (args.rounds * len(qs)),
                "recall_at_1000": float(np.mean(kept)),
                "memory_mib": index.memory_bytes() / 2**20,
            }
            out[f"{name}/{kind}"] = row
            print(
                f"{name} ({vectors.shape[1]}-d, {len(vectors):,} items) {kind}: "
                f"{row['ms_per_query']:.3f} ms of CPU per query, "
                f"recall@1000 {row['recall_at_1000']:.3f}, {row['memory_mib']:.0f} MiB"
            )
    return out


_HEALTH_SERVER = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(4))
health_pb2_grpc.add_HealthServicer_to_server(
    health.HealthServicer(experimental_non_blocking=True), server
)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()
"""

_AIO_HEALTH_SERVER = """
import asyncio
import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio
async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(aio.HealthServicer(), server)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def rtt(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sluice.bench.load import proc_usage
    from sluice.gateway.stages import SpinKeeper

    server = _AIO_HEALTH_SERVER if args.server == "aio" else _HEALTH_SERVER
    proc = subprocess.Popen(
        [sys.executable, "-c", server], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    loop = asyncio.new_event_loop()
    try:
        assert proc.stdout is not None
        target = f"127.0.0.1:{int(proc.stdout.readline())}"
        request = health_pb2.HealthCheckRequest()

        async def open_aio() -> Any:
            return grpc.aio.insecure_channel(target)

        aio_channel = loop.run_until_complete(open_aio())
        aio_check = health_pb2_grpc.HealthStub(aio_channel).Check

        async def aio_calls(n: int) -> None:
            for _ in range(n):
                await aio_check(request, timeout=5)

        with grpc.insecure_channel(target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check

            def repeat(call: Callable[[], Any]) -> Callable[[int], None]:
                def calls(n: int) -> None:
                    for _ in range(n):
                        call()

                return calls

            future = repeat(lambda: check.future(request, timeout=5).result())
            # name -> (n calls, whether a watch keeps the channel's spin thread alive
            # meanwhile, as GrpcStage's keeper does)
            variants: dict[str, tuple[Callable[[int], None], bool]] = {
                "blocking": (repeat(lambda: check(request, timeout=5)), False),
                "future": (future, False),
                "future_kept": (future, True),
                "aio_client": (lambda n: loop.run_until_complete(aio_calls(n)), False),
            }
            for calls, _ in variants.values():
                calls(200)
            out: dict[str, Any] = {}
            for _ in range(args.rounds):  # alternating, so that the host's load hits all
                for name, (calls, kept) in variants.items():
                    keeper = SpinKeeper(channel, "") if kept else None
                    s0 = proc_usage([proc.pid])[0]
                    c0, t0 = time.process_time(), time.perf_counter()
                    calls(args.calls)
                    out.setdefault(f"{name}_cpu_us", []).append(
                        1e6 * (time.process_time() - c0) / args.calls
                    )
                    out.setdefault(f"{name}_server_cpu_us", []).append(
                        1e6 * (proc_usage([proc.pid])[0] - s0) / args.calls
                    )
                    out.setdefault(f"{name}_wall_us", []).append(
                        1e6 * (time.perf_counter() - t0) / args.calls
                    )
                    if keeper is not None:
                        keeper.close()
        loop.run_until_complete(aio_channel.close())
    finally:
        loop.close()
        proc.kill()
    medians = {k: float(np.median(v)) for k, v in out.items()}
    print(
        f"per round trip to the {args.server} server (median of rounds; cpu: the client's): "
        + ", ".join(f"{k} {v:.0f}" for k, v in medians.items())
    )
    return medians


def _stage_calls(artifacts: Path, label: str, n: int, seed: int) -> tuple[Any, list[Any]]:
    """The in-process stage ``label`` and the calls the cascade made to it for a fixed request
    set: (context, candidates, max_candidates, offset) each."""
    import dataclasses

    from sluice.bench.compare import local_gateway
    from sluice.domain import StageName

    stage = next(s for s in StageName if s.label == label)
    gateway = local_gateway(artifacts)
    local = gateway.stages[stage]
    calls: list[Any] = []

    class Recorder:
        def call(self, ctx: Any, cands: Any, budget: Any) -> Any:
            calls.append((ctx, cands, budget.max_candidates, budget.offset))
            return local.call(ctx, cands, budget)

    recording = dataclasses.replace(gateway, stages={**gateway.stages, stage: Recorder()})
    call = _caller(recording, 10)
    for spec in _requests(artifacts, n, seed):
        call(spec)
    return local, calls


def _serve_stage(artifacts: Path, label: str, log_dir: Path) -> Any:
    """``sluice serve <label>`` on ``artifacts``, started as ``sluice up`` starts it, once its
    health says SERVING (the fine stage with the in-process torch ranker, as the in-process
    side has it)."""
    from sluice.launch import Cluster, Ports

    cluster = Cluster(
        artifacts,
        ports=Ports.random(),
        log_dir=log_dir,
        fine_backend="torch",
        extra_env={"SLUICE_FINE_TORCH_THREADS": "1"},
    )
    cluster.start_process(label)
    try:
        cluster.wait_serving(label, timeout_s=600)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _alternate(
    variants: dict[str, Callable[[], Any]], server: list[int], rounds: int, per: int
) -> dict[str, float]:
    """Run each variant once per round, alternating, so that the host's load hits all. The
    medians over rounds, per one of its ``per`` calls, as ``<variant>_<figure>``: wall time,
    this process's and ``server``'s CPU (ms), and both sides' context switches."""
    import os

    from sluice.bench.load import proc_switches, proc_usage

    here = [os.getpid()]
    out: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            s0, x0, y0 = proc_usage(server)[0], proc_switches(server), proc_switches(here)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            figures = {
                "wall_ms": 1e3 * (time.perf_counter() - t0),
                "client_cpu_ms": 1e3 * (time.process_time() - c0),
                "server_cpu_ms": 1e3 * (proc_usage(server)[0] - s0),
                "server_switches": float(proc_switches(server) - x0),
                "client_switches": float(proc_switches(here) - y0),
            }
            for key, value in figures.items():
                out.setdefault(f"{name}_{key}", []).append(value / per)
    return {k: float(np.median(v)) for k, v in out.items()}


def _print_variants(medians: dict[str, Any], variants: Iterable[str], per: str) -> None:
    """One line per variant of :func:`_alternate`'s medians (the server: the served process)."""
    for name in variants:
        m = {k.removeprefix(f"{name}_"): v for k, v in medians.items() if k.startswith(name)}
        print(
            f"  {name:10s} per {per} (median of rounds): wall {m['wall_ms']:.3f} ms, CPU client "
            f"{m['client_cpu_ms']:.3f} / server {m['server_cpu_ms']:.3f} ms, context switches "
            f"client {m['client_switches']:.1f} / server {m['server_switches']:.1f}"
        )


def stage(args: argparse.Namespace) -> dict[str, Any]:
    """One stage's engine in process, replaying the calls the cascade made to it: CPU per
    call, the best and the median of ``--rounds`` rounds. Run it from two checkouts in turn."""
    from sluice.domain import Budget

    local, calls = _stage_calls(args.artifacts, args.stage, args.requests, args.seed)
    budgets = [(c, k, Budget.within(m, 5.0, o)) for c, k, m, o in calls]
    rounds = []
    for _ in range(args.rounds):
        started = time.process_time()
        for ctx, cands, budget in budgets:
            local.call(ctx, cands, budget)
        rounds.append(1e3 * (time.process_time() - started) / max(len(budgets), 1))
    result = {
        "stage": args.stage,
        "calls": len(budgets),
        "best_cpu_ms": min(rounds),
        "median_cpu_ms": float(np.median(rounds)),
    }
    print(
        f"{args.name}: {args.stage} {result['best_cpu_ms']:.3f} ms of CPU per call (median round "
        f"{result['median_cpu_ms']:.3f}; {len(budgets)} calls, {args.rounds} rounds)"
    )
    return result


def hop(args: argparse.Namespace) -> dict[str, Any]:
    """One stage in process against the same calls over gRPC to ``sluice serve``, and a health
    check on that server (the bare hop), alternating: where a hop's cost goes."""
    import tempfile

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sluice.config import GatewaySettings
    from sluice.domain import Budget
    from sluice.gateway.stages import GrpcStage

    local, calls = _stage_calls(args.artifacts, args.stage, args.requests, args.seed)
    binding = importlib.import_module(f"sluice.{args.stage}.service").BINDING
    with tempfile.TemporaryDirectory() as logs:
        cluster = _serve_stage(args.artifacts, args.stage, Path(logs))
        address = cluster.address(args.stage)
        remote = GrpcStage(binding, address, packed=GatewaySettings().packed_candidates)
        check = health_pb2_grpc.HealthStub(remote.channel).Check
        try:

            def run(stage: Any) -> list[Any]:
                return [stage.call(c, k, Budget.within(m, 5.0, o)) for c, k, m, o in calls]

            def health() -> None:
                for _ in calls:
                    check(health_pb2.HealthCheckRequest(), timeout=5)

            mine, theirs = run(local), run(remote)  # also the warm-up
            same = sum(
                np.array_equal(a.candidates.item_ids, b.candidates.item_ids)
                and np.array_equal(a.candidates.scores, b.candidates.scores)
                and a.total_size == b.total_size
                for a, b in zip(mine, theirs, strict=True)
            )
            variants: dict[str, Callable[[], Any]] = {
                "in_process": lambda: run(local),
                "grpc": lambda: run(remote),
                "health": health,
            }
            server = [cluster.processes[args.stage].pid]
            medians: dict[str, Any] = _alternate(variants, server, args.rounds, len(calls))
        finally:
            remote.close()
            cluster.stop()
    medians |= {"stage": args.stage, "calls": len(calls), "identical_answers": same}
    print(f"{args.stage}: {len(calls)} calls, answers identical in process and over gRPC: {same}")
    _print_variants(medians, variants, "call")
    return medians


def served(args: argparse.Namespace) -> dict[str, Any]:
    """The in-process cascade against the same requests to a served one-machine gateway,
    one at a time, alternating: what the gateway's process and gRPC add per request."""
    import os
    import tempfile

    from sluice.bench.compare import local_gateway
    from sluice.bench.load import KIND_SEARCH, GatewayDriver
    from sluice.launch import Cluster, Ports

    local = _caller(local_gateway(args.artifacts), 10)
    specs = _requests(args.artifacts, args.requests, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(
            args.artifacts,
            ports=Ports.random(),
            log_dir=Path(tmp) / "logs",
            event_log_dir=Path(tmp) / "events",
            stages="local",
            fine_backend="torch",
            extra_env={"SLUICE_FINE_TORCH_THREADS": "1"},  # as local_gateway has it
            pin_cpus=args.pin_cpus,
        )
        cluster.start(timeout_s=600)
        cores = os.sched_getaffinity(0)
        plan = cluster.cpu_plan()
        if plan:  # this process (client, and the in-process side) off the gateway's core
            os.sched_setaffinity(0, plan["*"])
        driver = GatewayDriver(cluster.gateway_address, page_size=10)
        try:

            def remote(spec: Any) -> Any:  # blocking, one at a time
                call = driver.stub.Search if spec.kind == KIND_SEARCH else driver.stub.Recommend
                request = driver.request((spec.kind, spec.user_id, spec.query))
                return call(request, timeout=30).page

            # the first pass is also the warm-up: both sides start from the same state
            mine = [local(spec) for spec in specs]
            theirs = [remote(spec) for spec in specs]
            same = sum(
                list(a.candidates.item_ids) == list(b.item_ids)
                and np.allclose(a.candidates.scores, b.scores, rtol=1e-6, atol=1e-6)
                for a, b in zip(mine, theirs, strict=True)
            )
            variants: dict[str, Callable[[], Any]] = {
                "in_process": lambda: [local(spec) for spec in specs],
                "served": lambda: [remote(spec) for spec in specs],
            }
            gateway = [cluster.processes["gateway"].pid]
            medians: dict[str, Any] = _alternate(variants, gateway, args.rounds, len(specs))
        finally:
            driver.channel.close()
            cluster.stop()
            os.sched_setaffinity(0, cores)
    medians |= {"requests": len(specs), "identical_pages": same, "pinned": args.pin_cpus}
    print(f"{len(specs)} requests, pages identical in process and served: {same}")
    _print_variants(medians, variants, "request")
    return medians


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.bench.hotpath", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cpu", help="in-process CPU per request")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--name", default="this checkout")
    p.add_argument(
        "--freeze", action="store_true", help="freeze the heap after the warm-up (gc.freeze)"
    )
    p = sub.add_parser("pages", help="write or compare the pages of a fixed request set")
    p.add_argument("artifacts", type=Path)
    p.add_argument("file", type=Path)
    p.add_argument("--requests", type=int, default=600)
    p = sub.add_parser("encoder", help="fp32 against int8 query encoding")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--queries", type=int, default=600)
    p = sub.add_parser("ann", help="the recall indexes as each kind: CPU and recall@1000")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--kinds", default="ivf_flat,ivf_fp16,ivf_rabitq")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("rtt", help="blocking against future gRPC round trips")
    p.add_argument(
        "--server", choices=("sync", "aio"), default="sync", help="the health server's kind"
    )
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("stage", help="one stage's engine in process, replaying its calls")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--stage", choices=("recall", "coarse", "fine", "rerank"), default="coarse")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default="this checkout")
    p = sub.add_parser("hop", help="one stage in process against over gRPC")
    p.add_argument("artifacts", type=Path)
    p.add_argument("--stage", choices=("recall", "coarse", "fine", "rerank"), default="rerank")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("served", help="the in-process cascade against a served one machine")
    p.add_argument("artifacts", type=Path)
    p.add_argument(
        "--pin-cpus",
        action="store_true",
        help="the gateway on a core of its own (sluice up --pin-cpus), this process on the rest",
    )
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    for p in sub.choices.values():
        p.add_argument("--seed", type=int, default=7)
        p.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    commands = {
        "cpu": cpu,
        "pages": pages,
        "encoder": encoder,
        "ann": ann,
        "rtt": rtt,
        "stage": stage,
        "hop": hop,
        "served": served,
    }
    result = commands[args.command](args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
