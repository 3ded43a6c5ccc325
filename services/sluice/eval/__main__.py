"""``python -m sluice.eval {recommend,search,blurbs,refine}``: quality of the served cascade.

* ``recommend`` — leave-one-out by time on an interaction dataset (amazon-beauty
  layout): the holdout build, the offline models in process, every test
  user's Recommend through the served gateway, and per-stage recall
  (:mod:`sluice.eval.served`).
* ``search`` — labelled queries on a product corpus (crowdflower-search
  layout): BM25 and dense baselines, the k-fold CV of the learned coarse
  combination, and every query's Search through the served gateway
  (:mod:`sluice.eval.search`).
* ``blurbs`` — labelled queries: how often a blurb holds a query word that the item's
  title lacks, against the item's first sentence (:mod:`sluice.eval.blurbs`).
* ``refine`` — multi-turn refinement tasks on the generated shop, through search sessions
  (:mod:`sluice.eval.refine`); ``--artifacts`` names the build, not a dataset.

Builds are cached under ``var/eval/<dataset>/`` and reused; ``--rebuild``
forces a new one. Reports go to ``var/eval/<dataset>/*-report.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from sluice import paths


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sluice.launch import stop_clusters_on_signals

    stop_clusters_on_signals()
    parser = argparse.ArgumentParser(prog="sluice eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)

    r = sub.add_parser("recommend", help="leave-one-out: offline, served, per stage")
    r.add_argument("--data", type=Path, required=True, help="dataset directory")
    r.add_argument("--rebuild", action="store_true", help="build again even if cached")
    r.add_argument("--users", type=int, default=0, help="a seeded sample of test users (0: all)")
    r.add_argument("--stage-users", type=int, default=0, help="per-stage sample (0: as served)")
    r.add_argument("--threads", type=int, default=8, help="client threads for the served run")
    r.add_argument("--skip-offline", action="store_true")
    r.add_argument("--skip-sasrec", action="store_true", help="skip the ids-only baseline")
    r.add_argument("--sasrec-budget", type=float, default=900.0, help="SASRec training seconds")
    r.add_argument("--skip-served", action="store_true")
    r.add_argument("--skip-stages", action="store_true")
    r.add_argument(
        "--ablation-users",
        type=int,
        default=0,
        help="also run in-process variants of the cascade on this many users (0: skip)",
    )
    r.add_argument(
        "--exposure",
        action="store_true",
        help="also re-rank the users' pages in process under each exposure setting: quality "
        "against provider exposure (sluice.eval.exposure)",
    )
    r.add_argument(
        "--arms",
        type=Path,
        help="an experiments file: replay the users through two arms of an experiment and "
        "report the paired difference with a bootstrap interval (sluice.eval.arms)",
    )
    r.add_argument("--experiment", help="the experiment of --arms (default: the file's first)")
    r.add_argument(
        "--compare",
        nargs=2,
        metavar=("ARM", "ARM"),
        help="the two arms of --arms to compare (default: the experiment's first two)",
    )
    r.add_argument(
        "--pages",
        type=Path,
        help="also run every user's Recommend through the cascade in this process and write "
        "the pages to this file; when it exists, compare with it instead: the same top 10s "
        "and the paired HR@10 and NDCG@10 differences (run it from two checkouts in turn)",
    )
    r.add_argument(
        "--train-budget",
        type=float,
        default=None,
        help="ranker training seconds for a new build (default: the build's, 1080)",
    )
    r.add_argument(
        "--train-threads",
        type=int,
        default=None,
        help="torch threads for a new build's ranker training (default: RankerConfig's); "
        "1 trains faster than 2 on a machine other jobs keep busy",
    )
    r.add_argument("--out", type=Path, help="evaluation folder (default var/eval/<dataset>)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("search", help="labelled queries: baselines, CV, served Search")
    s.add_argument("--data", type=Path, required=True, help="dataset directory")
    s.add_argument("--rebuild", action="store_true", help="build again even if cached")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--repeats", type=int, default=3, help="CV repeats with reshuffled folds")
    s.add_argument("--skip-cv", action="store_true")
    s.add_argument("--skip-served", action="store_true")
    s.add_argument(
        "--skip-out-of-fold",
        action="store_true",
        help="no served run per fold (weights fitted without the fold's queries)",
    )
    s.add_argument("--threads", type=int, default=4, help="client threads for the served run")
    s.add_argument("--out", type=Path, help="evaluation folder (default var/eval/<dataset>)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument(
        "--baseline",
        type=Path,
        help="another run's search-report.json: compare the served out-of-fold NDCG@10 "
        "query by query (paired bootstrap)",
    )
    from sluice.embed.batch import BUILD_ENCODERS, DEFAULT_ENCODER

    s.add_argument(
        "--encoder",
        choices=list(BUILD_ENCODERS),
        default=DEFAULT_ENCODER,
        help="the build's text encoder (sluice build --encoder); a cached build made with "
        "another is rebuilt, so give each its own --out",
    )

    b = sub.add_parser("blurbs", help="labelled queries: do blurbs hold the query's words")
    b.add_argument("--data", type=Path, required=True, help="dataset directory")
    b.add_argument("--out", type=Path, help="evaluation folder (default var/eval/<dataset>)")

    f = sub.add_parser("refine", help="multi-turn refinement tasks through search sessions")
    f.add_argument(
        "--artifacts",
        type=Path,
        default=paths.default_artifacts(),
        help="a build of the generated shop (sluice build), made with its colours",
    )
    f.add_argument("--tasks", type=int, default=300)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--splits",
        default="",
        help="comma-separated template splits to run (default: all); tune on the tuning "
        "splits alone, so that a held-out split stays unseen",
    )
    f.add_argument("--out", type=Path, help="the report (default: beside the artifacts)")

    args = parser.parse_args(argv)
    if args.task == "search" and args.baseline is not None:
        from sluice.eval.search import baseline_rankings

        if args.skip_served or args.skip_out_of_fold:
            parser.error("--baseline compares the served out-of-fold run: do not skip it")
        try:
            baseline_rankings(args.baseline)
        except ValueError as err:
            parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if args.task == "recommend":
        from sluice.eval.served import RecommendOptions, run_recommend

        run_recommend(
            RecommendOptions(
                data=args.data,
                rebuild=args.rebuild,
                users=args.users,
                stage_users=args.stage_users,
                threads=args.threads,
                offline=not args.skip_offline,
                sasrec=not args.skip_sasrec,
                sasrec_budget_s=args.sasrec_budget,
                served=not args.skip_served,
                stages=not args.skip_stages,
                ablation_users=args.ablation_users,
                exposure=args.exposure,
                arms=args.arms,
                experiment=args.experiment,
                compare=tuple(args.compare) if args.compare else None,
                pages=args.pages,
                seed=args.seed,
                progress=not args.no_progress,
                root=args.out,
                build_kwargs=_build_kwargs(args),
            )
        )
    elif args.task == "refine":
        from sluice.eval.refine import run_refine

        splits = [s for s in args.splits.split(",") if s] or None
        run_refine(args.artifacts, args.tasks, args.seed, args.out, splits)
    elif args.task == "blurbs":
        from sluice.eval.blurbs import run_blurbs
        from sluice.eval.served import eval_dir

        run_blurbs(args.data, (args.out or eval_dir(args.data)) / "blurbs-report.json")
    else:
        from sluice.eval.search import SearchOptions, run_search

        run_search(
            SearchOptions(
                data=args.data,
                rebuild=args.rebuild,
                served=not args.skip_served,
                out_of_fold=not args.skip_out_of_fold,
                cv=not args.skip_cv,
                folds=args.folds,
                repeats=args.repeats,
                threads=args.threads,
                progress=not args.no_progress,
                root=args.out,
                build_kwargs={"encoder": args.encoder},
                baseline=args.baseline,
            )
        )
    return 0


def _build_kwargs(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    if args.train_budget is not None:
        out["train_budget_s"] = args.train_budget
    if args.train_threads is not None:
        from sluice.fine.model import RankerConfig

        out["ranker"] = RankerConfig(num_threads=args.train_threads)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
