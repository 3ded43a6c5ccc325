"""The ``sluice`` command: build, serve, up, demo, search, recommend, eval, bench."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

# grpc_env first: grpcio reads its settings from the environment once, when it loads
from sluice import grpc_env, paths  # noqa: F401
from sluice.wiring import SERVICES


def _build(args: argparse.Namespace) -> int:
    from sluice.build.pipeline import BuildOptions, build, refit
    from sluice.data.synthetic import ShopSpec
    from sluice.fine.model import RankerConfig

    ranker = RankerConfig(loss=args.loss)
    if args.negatives is not None:
        ranker.num_negatives = args.negatives
    build_id = ""
    out = Path(args.out)
    if args.store:  # a new build beside the store's others, published only when asked
        from sluice.builds import BUILDS, new_build_id

        build_id = new_build_id()
        out = Path(args.store) / BUILDS / build_id
    options = BuildOptions(
        out=out,
        build_id=build_id,
        data=Path(args.data) if args.data else None,
        shop=ShopSpec(num_items=args.items, num_users=args.users, seed=args.seed),
        model_repository=Path(args.model_repository),
        holdout=args.holdout,
        seed=args.seed,
        epochs=args.epochs,
        ranker=ranker,
        shards=args.shards,
        shard_index_kind=args.shard_index_kind,
        valid_users=args.valid_users,
        encoder=args.encoder,
        progress=not args.no_progress,
        catalog_as_of_ms=args.catalog_as_of_ms,
    )
    (refit if args.refit else build)(options)
    if args.store:
        print(f"built {build_id} in {args.store}", flush=True)
        if args.publish:
            return _publish(argparse.Namespace(store=args.store, build_id=build_id))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from sluice.builds import BUILDS, publish

    store = Path(args.store)
    build_id = args.build_id
    if not build_id:  # the newest complete build (ids sort by time)
        done = sorted(p.parent.name for p in (store / BUILDS).glob("*/manifest.json"))
        if not done:
            print(f"no complete build in {store / BUILDS}", file=sys.stderr)
            return 1
        build_id = done[-1]
    publish(store, build_id)
    print(f"published {build_id}: the services of {store} swap to it", flush=True)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from sluice.artifacts import Artifacts
    from sluice.build.shards import write_shards

    manifest = write_shards(Artifacts(Path(args.artifacts)), args.count, args.index_kind)
    sizes = ", ".join(str(b - a) for a, b in manifest.ranges)
    print(f"wrote {manifest.count} recall shards of {args.artifacts} ({sizes} items)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from sluice.data.interactions import write_dataset
    from sluice.data.synthetic import ShopSpec, generate_shop

    spec = ShopSpec(num_items=args.items, num_users=args.users, seed=args.seed)
    catalog, interactions = generate_shop(spec)
    write_dataset(Path(args.out), catalog, interactions)
    print(
        f"wrote the generated shop to {args.out}: {len(catalog)} items, "
        f"{len(interactions.user_ids)} users, {len(interactions.item_rows)} interactions"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from sluice.serve import serve

    serve(args.service)
    return 0


def _cluster(args: argparse.Namespace, supervise: bool = False) -> object:
    from sluice.launch import Cluster

    if args.pin_cpus and args.stages != "local":
        raise SystemExit("--pin-cpus needs --stages local (it plans the one-machine layout)")
    return Cluster(
        artifacts=Path(args.artifacts),
        log_dir=paths.var("logs"),
        event_log_dir=paths.var("events"),
        fine_backend=args.fine_backend,
        triton_gpu=args.gpu,
        stages=args.stages,
        supervise=supervise,
        replicas=args.replicas,
        stage_replicas=args.stage_replicas or 0,
        recall_shards=args.recall_shards,
        catalog_keys=tuple(args.catalog_key),
        pin_cpus=args.pin_cpus,
    )


def _up(args: argparse.Namespace) -> int:
    from sluice.launch import Cluster

    cluster = _cluster(args, supervise=True)  # a process that dies is restarted, with back-off
    assert isinstance(cluster, Cluster)
    print("starting Triton and the services (logs in var/logs/) …", flush=True)
    cluster.start(progress=True)
    behind = f", HAProxy in front of {cluster.replicas} gateways" if cluster.replicas > 1 else ""
    print(
        f"Sluice is up: storefront API at {cluster.gateway_address}{behind} (Ctrl-C stops it)",
        flush=True,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


def demo_build_args(artifacts: Path, items: int, users: int) -> argparse.Namespace:
    """What ``sluice demo`` builds: ``sluice build`` with its own defaults (an option the
    build gains later gets its default here too)."""
    argv = ["build", "--out", str(artifacts), "--items", str(items), "--users", str(users)]
    return command_parser().parse_args(argv)


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sluice.artifacts import Artifacts
    from sluice.client import StorefrontClient, render
    from sluice.launch import Cluster

    console = Console()
    artifacts = Path(args.artifacts)
    if not (artifacts / "manifest.json").exists() or args.rebuild:
        console.rule("build the embedded default shop")
        _build(demo_build_args(artifacts, args.items, args.users))
    console.rule("start Triton and the services")
    cluster = _cluster(args)
    assert isinstance(cluster, Cluster)
    cluster.start(progress=True)
    try:
        a = Artifacts(artifacts)
        users, histories = a.users()
        user = users[0]
        client = StorefrontClient(cluster.gateway_address)
        console.rule("sample queries")
        recent = ", ".join(a.catalog.titles[a.catalog.row(i)][:40] for i in histories[0][-3:])
        render(f"Recommend for {user} (recently: {recent})", client.recommend(user, 10), console)
        render("Recommend for a new user (cold start)", client.recommend("someone-new", 5), console)
        for query in ("trail running shoes", "noise cancelling headphones", "espresso"):
            render(f"Search {query!r} for {user}", client.search(query, user, 8), console)
        anchor = int(histories[0][-1])
        render(
            f"Similar to {a.catalog.titles[a.catalog.row(anchor)]!r}",
            client.recommend(user, 5, anchor),
            console,
        )
        client.close()
    finally:
        cluster.stop()
    console.print("[bold green]demo done[/]; `sluice up` keeps the services running.")
    return 0


def _query(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sluice.client import StorefrontClient, render

    client = StorefrontClient(args.address)
    console = Console()
    if args.command == "search":
        render(
            f"Search {args.query!r}", client.search(args.query, args.user, args.page_size), console
        )
    else:
        render(
            f"Recommend for {args.user}",
            client.recommend(args.user, args.page_size, args.similar_to),
            console,
        )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = command_parser(argv).parse_args(argv)
    result: int = args.fn(args)
    return result


def command_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its arguments and their defaults (``argv``: the command line,
    which ``sluice bench`` passes on whole)."""
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train models and write versioned artifacts")
    b.add_argument(
        "--data", help="dataset directory (amazon-beauty layout); default: generated shop"
    )
    b.add_argument("--out", default=str(paths.default_artifacts()))
    b.add_argument(
        "--store",
        help="write a new versioned build into this build store (<store>/builds/<id>) "
        "instead of --out; the services serving the store swap to it once published",
    )
    b.add_argument(
        "--publish", action="store_true", help="with --store: publish the build when it is done"
    )
    b.add_argument("--model-repository", default=str(paths.default_model_repository()))
    b.add_argument("--items", type=int, default=5000, help="generated shop: items")
    b.add_argument("--users", type=int, default=3000, help="generated shop: users")
    b.add_argument("--holdout", type=int, default=0, help="drop each user's last n interactions")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--epochs", type=int, default=200)
    b.add_argument(
        "--loss",
        choices=("full", "sampled"),
        default="full",
        help="fine ranker training: full softmax over every item, or the sampled softmax "
        "(in-batch and log-uniform negatives, logQ-corrected; for large catalogs)",
    )
    b.add_argument(
        "--negatives",
        type=_positive,
        default=None,
        help="--loss sampled: shared negatives per batch (default: RankerConfig's, 2048)",
    )
    b.add_argument(
        "--valid-users",
        type=int,
        default=0,
        help="validate the ranker's training on this many users (a seeded sample); 0: all",
    )
    b.add_argument(
        "--shards",
        type=int,
        default=0,
        help="also cut recall into this many shards (sluice.recall.shards); 0: none",
    )
    b.add_argument(
        "--shard-index-kind",
        default="auto",
        help="each shard's FAISS index (sluice.recall.ann_index: auto, flat, ivf_flat, ...)",
    )
    from sluice.embed.batch import BUILD_ENCODERS, DEFAULT_ENCODER

    b.add_argument(
        "--encoder",
        choices=list(BUILD_ENCODERS),
        default=DEFAULT_ENCODER,
        help="how item texts and pseudo-queries are embedded: "
        + "; ".join(f"{e.name}: {e.help}" for e in BUILD_ENCODERS.values()),
    )
    b.add_argument(
        "--catalog-as-of-ms",
        type=int,
        default=None,
        help="when the shop's catalog export was taken, unix ms: the live catalog updates "
        "accepted before it are not applied to this build (default: when the build starts)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    b.add_argument(
        "--refit",
        action="store_true",
        help="only fit the coarse weights and the fusion of the build in --out again",
    )
    b.set_defaults(fn=_build)

    pb = sub.add_parser(
        "publish", help="make a build of a build store current (services swap without restart)"
    )
    pb.add_argument("store", help="the build store (--store of `sluice build`)")
    pb.add_argument("build_id", nargs="?", default="", help="default: the newest build")
    pb.set_defaults(fn=_publish)

    g = sub.add_parser(
        "generate",
        help="write the generated shop `sluice build` trains on by default as a dataset "
        "directory (items.tsv, interactions.tsv.gz), e.g. for `sluice eval recommend --data`",
    )
    g.add_argument("out", help="the dataset directory to write")
    g.add_argument("--items", type=int, default=5000)
    g.add_argument("--users", type=int, default=3000)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_generate)

    sh = sub.add_parser(
        "shard", help="cut a build's recall into shards (contiguous row ranges), in place"
    )
    sh.add_argument("artifacts", help="the build (its directory)")
    sh.add_argument("count", type=_positive, help="how many shards")
    sh.add_argument(
        "--index-kind",
        default="auto",
        help="each shard's FAISS index (sluice.recall.ann_index: auto, flat, ivf_flat, ...); "
        "flat shards answer exactly what the whole build does",
    )
    sh.set_defaults(fn=_shard)

    s = sub.add_parser("serve", help="run one service")
    s.add_argument("service", choices=SERVICES)
    s.set_defaults(fn=_serve)

    for name, fn, help_text in (
        ("up", _up, "start Triton and every service"),
        ("demo", _demo, "build if needed, start everything, send sample queries"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--artifacts", default=str(paths.default_artifacts()))
        p.add_argument("--fine-backend", choices=("triton", "onnx", "torch"), default="triton")
        p.add_argument("--gpu", action="store_true", help="Triton with the KIND_GPU config")
        p.add_argument(
            "--stages",
            choices=("grpc", "local"),
            default="grpc",
            help="local: one gateway process runs the four stages beside Triton",
        )
        p.add_argument(
            "--replicas",
            type=_positive,
            default=1,
            help="gateway processes; more than one run behind HAProxy (on the storefront "
            "port) and share their state and event log in a redis-server the layout starts",
        )
        p.add_argument(
            "--stage-replicas",
            type=_positive,
            default=None,
            help="processes of each stage service (default: 2 with --replicas above 1, else "
            "1), reached with round_robin, health checks and retries",
        )
        p.add_argument(
            "--pin-cpus",
            action="store_true",
            help="with --stages local: each gateway on a core of its own, Triton and the rest "
            "on the cores left (docs/benchmarks.md)",
        )
        p.add_argument(
            "--recall-shards",
            type=int,
            default=0,
            help="serve the build's sharded catalog (`sluice shard`): one process per shard, "
            "recall a front over them",
        )
        p.add_argument(
            "--catalog-key",
            action="append",
            default=[],
            help="a key for CatalogService/UpdateItems (repeatable): live catalog updates on, "
            "every service following one update log (var/events/catalog-updates.jsonl)",
        )
        if name == "demo":
            p.add_argument("--rebuild", action="store_true")
            p.add_argument("--items", type=int, default=5000)
            p.add_argument("--users", type=int, default=3000)
        p.set_defaults(fn=fn)

    for name in ("search", "recommend"):
        q = sub.add_parser(name, help=f"send a {name} request to a running gateway")
        if name == "search":
            q.add_argument("query")
        q.add_argument("--user", default="")
        q.add_argument("--page-size", type=int, default=10)
        q.add_argument("--similar-to", type=int, default=0)
        q.add_argument("--address", default="127.0.0.1:50051")
        q.set_defaults(fn=_query)

    bn = sub.add_parser("bench", help="serving benchmarks: load, scale, compare, flops")
    from sluice.bench.__main__ import build_parser as bench_parser
    from sluice.bench.__main__ import run as bench_run

    bench_parser(bn)
    bench_argv = list(argv if argv is not None else sys.argv[1:])[1:]
    bn.set_defaults(fn=lambda a: bench_run(a, bench_argv))

    ev = sub.add_parser(
        "eval",
        help="quality: `sluice eval {recommend,search} --data DIR` (served cascade, baselines)",
        add_help=False,
    )
    ev.add_argument("-h", "--help", dest="eval_help", action="store_true")
    ev.add_argument("eval_args", nargs=argparse.REMAINDER)

    def _eval(a: argparse.Namespace) -> int:
        from sluice.eval.__main__ import main as eval_main

        return eval_main(["--help"] if a.eval_help else a.eval_args)

    ev.set_defaults(fn=_eval)
    return parser


if __name__ == "__main__":
    sys.exit(main())
