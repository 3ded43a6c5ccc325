"""Full vs sampled softmax for the fine ranker, on one generated shop.

``python -m sluice.bench.softmax --items 100000 --users 20000 --json OUT``

Generates the shop ``sluice build --items N --users U --seed S`` generates, holds out each
user's last item as the build does (training on the rest, early stopping on validation
NDCG@10 with full ranking over every item), takes the MiniLM title table and the
pseudo-queries from the build's cache (``var/cache``; computed there if missing), and trains
the same :class:`~sluice.fine.model.RankerConfig` once per loss: ``full`` and then each
``sampled`` setting asked for (``--negatives``, ``--samplers``). The runs are sequential, in
this one process, on the same thread count and seed, each to early stopping or ``--epochs``.

Reported per run: the training seconds (the training steps alone, from ``train_info``; set-up
and validation excluded) in all and up to the best epoch, the epochs, seconds per epoch, the
best validation NDCG@10 and HR@10 and the load average before and after; and for each sampled
run its ratios to the full run. Issue 11's target: NDCG ratio >= 0.98 with time ratio <= 1/3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.fine.model import SAMPLERS, RankerConfig

log = logging.getLogger(__name__)

TARGET_NDCG_RATIO = 0.98
TARGET_TIME_RATIO = 1 / 3


def _csv(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def add_softmax_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--items", type=int, default=100_000, help="generated shop: items")
    ap.add_argument("--users", type=int, default=20_000, help="generated shop: users")
    ap.add_argument("--seed", type=int, default=0, help="shop, pseudo-query and training seed")
    ap.add_argument("--epochs", type=int, default=200, help="epoch cap of every run")
    ap.add_argument(
        "--losses", default="full,sampled", help="which runs: full, sampled or both (in order)"
    )
    ap.add_argument(
        "--negatives", default="2048", help="sampled runs: shared negatives per batch (a list)"
    )
    ap.add_argument(
        "--samplers", default="log_uniform", help=f"sampled runs: proposals (a list of {SAMPLERS})"
    )
    ap.add_argument(
        "--no-in-batch", action="store_true", help="sampled runs: no in-batch negatives"
    )
    ap.add_argument("--lr", type=float, default=RankerConfig.lr, help="every run's learning rate")
    ap.add_argument("--patience", type=int, default=RankerConfig.patience)
    ap.add_argument("--threads", type=int, default=RankerConfig.num_threads, help="torch threads")
    ap.add_argument(
        "--time-budget", type=float, default=None, help="seconds per run (default: none)"
    )
    ap.add_argument("--cache", type=Path, default=None, help="text cache (default var/cache)")
    from sluice.embed.batch import BUILD_ENCODERS, DEFAULT_ENCODER

    ap.add_argument(
        "--encoder",
        choices=list(BUILD_ENCODERS),
        default=DEFAULT_ENCODER,
        help="the title table and pseudo-queries, as `sluice build --encoder` embeds them",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--progress", action="store_true", help="progress bars")


def configs(args: argparse.Namespace) -> list[RankerConfig]:
    """The runs asked for, in order: the full softmax first, then each sampled setting."""
    base = RankerConfig(lr=args.lr, patience=args.patience, num_threads=args.threads)
    losses = _csv(str, args.losses)
    unknown = set(losses) - {"full", "sampled"}
    if unknown or not losses:
        raise SystemExit(f"--losses: expected full and/or sampled, got {args.losses!r}")
    out: list[RankerConfig] = []
    if "full" in losses:
        out.append(replace(base, loss="full"))
    if "sampled" in losses:
        for sampler in _csv(str, args.samplers):
            for k in _csv(int, args.negatives):
                out.append(
                    replace(
                        base,
                        loss="sampled",
                        sampler=sampler,
                        num_negatives=k,
                        in_batch_negatives=not args.no_in_batch,
                    )
                )
    return out


def _label(cfg: RankerConfig) -> str:
    if cfg.loss == "full":
        return "full"
    batch = "+in-batch" if cfg.in_batch_negatives else ""
    return f"sampled({cfg.sampler}, {cfg.num_negatives}{batch})"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def prepare(
    items: int, users: int, seed: int, cache: Path, progress: bool, encoder: str = "minilm"
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray, dict[str, Any]]:
    """Training sequences, validation sequences, title table and pseudo-queries, as built."""
    from sluice.data.synthetic import ShopSpec, generate_shop
    from sluice.eval.offline import pseudo_query_table, text_table

    t0 = time.perf_counter()
    catalog, interactions = generate_shop(ShopSpec(num_items=items, num_users=users, seed=seed))
    sequences = interactions.sequences()
    valid = [s for s in sequences if len(s) >= 3]  # as sluice.build.pipeline.build
    train = [s[:-1] for s in sequences]
    table = text_table(catalog, cache_dir=cache, progress=progress, encoder=encoder)
    pseudo = pseudo_query_table(
        catalog, per_item=2, seed=seed, cache_dir=cache, progress=progress, encoder=encoder
    )
    info = {
        "items": len(catalog),
        "users": interactions.num_users,
        "interactions": len(interactions),
        "training_targets": int(sum(max(len(s) - 1, 0) for s in train)),
        "validation_users": len(valid),
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    return train, valid, table, pseudo, info


def run_one(
    cfg: RankerConfig,
    train: Sequence[np.ndarray],
    valid: Sequence[np.ndarray],
    table: np.ndarray,
    pseudo: np.ndarray,
    *,
    epochs: int,
    seed: int,
    time_budget_s: float | None,
    progress: bool,
) -> dict[str, Any]:
    """Train one configuration; its timings, quality and per-epoch history."""
    from sluice.fine.train import train_ranker

    history: list[dict[str, float]] = []
    load_start = _load()
    model = train_ranker(
        train,
        len(table) - 1,
        table,
        cfg,
        epochs=epochs,
        seed=seed,
        valid_sequences=valid,
        progress=progress,
        time_budget_s=time_budget_s,
        pseudo_queries=pseudo,
        on_epoch=history.append,
    )
    info = model.train_info
    epochs_run = int(info["epochs_run"])
    return {
        "label": _label(cfg),
        "config": asdict(cfg),
        "train_s": round(info["train_seconds"], 1),
        "train_s_to_best": round(info["train_seconds_to_best"], 1),
        "epochs": epochs_run,
        "best_epoch": int(info["best_epoch"]),
        "epoch_s": round(info["train_seconds"] / max(epochs_run, 1), 1),
        "val_ndcg10": round(info["best_val_ndcg10"], 5),
        "val_hr10": round(info["best_val_hr10"], 5),
        "total_s": round(info["seconds"], 1),  # with set-up and validation
        "loadavg_start": load_start,
        "loadavg_end": _load(),
        "history": [{k: round(float(v), 5) for k, v in h.items()} for h in history],
    }


def time_to_reach(history: Sequence[dict[str, float]], ndcg: float) -> float | None:
    """Training seconds (validation excluded) until the first epoch whose validation
    NDCG@10 is at least ``ndcg``; None if no epoch got there."""
    spent = 0.0
    for epoch in history:
        spent += float(epoch["epoch_s"])
        if float(epoch.get("val_ndcg10", -1.0)) >= ndcg:
            return spent
    return None


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sampled run's ratios to the full run (none without a full run)."""
    full = next((r for r in runs if r["config"]["loss"] == "full"), None)
    if full is None:
        return []
    out = []
    for r in runs:
        if r is full:
            continue
        ndcg = r["val_ndcg10"] / full["val_ndcg10"] if full["val_ndcg10"] > 0 else float("nan")
        time_ratio = r["train_s"] / full["train_s"] if full["train_s"] > 0 else float("nan")
        to_best = (
            r["train_s_to_best"] / full["train_s_to_best"]
            if full["train_s_to_best"] > 0
            else float("nan")
        )
        reach = time_to_reach(r["history"], TARGET_NDCG_RATIO * full["val_ndcg10"])
        out.append(
            {
                "label": r["label"],
                "ndcg_ratio": round(ndcg, 4),
                # training seconds until an epoch first scored >= 98% of the full run's best,
                # against the full run's seconds to its best (None: never reached)
                "train_s_to_98pct": None if reach is None else round(reach, 1),
                "time_ratio_to_98pct": None
                if reach is None or full["train_s_to_best"] <= 0
                else round(reach / full["train_s_to_best"], 4),
                "hr_ratio": round(r["val_hr10"] / max(full["val_hr10"], 1e-12), 4),
                "time_ratio": round(time_ratio, 4),
                "time_ratio_to_best": round(to_best, 4),
                "epoch_time_ratio": round(r["epoch_s"] / max(full["epoch_s"], 1e-12), 4),
                "meets_target": bool(ndcg >= TARGET_NDCG_RATIO and time_ratio <= TARGET_TIME_RATIO),
            }
        )
    return out


def _or_dash(ratio: dict[str, Any] | None, key: str, spec: str) -> str:
    value = None if ratio is None else ratio.get(key)
    return "—" if value is None else format(value, spec)


def table_markdown(runs: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    by_label = {r["label"]: r for r in ratios}
    lines = [
        "| loss | epochs (best) | s/epoch | train s | train s to best | NDCG@10 | HR@10 "
        "| NDCG ratio | time ratio | s to 98% of full | ratio to full's s to best |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = by_label.get(r["label"])
        lines.append(
            f"| {r['label']} | {r['epochs']} ({r['best_epoch']}) | {r['epoch_s']:.1f} "
            f"| {r['train_s']:.0f} | {r['train_s_to_best']:.0f} | {r['val_ndcg10']:.4f} "
            f"| {r['val_hr10']:.4f} "
            f"| {'—' if ratio is None else format(ratio['ndcg_ratio'], '.3f')} "
            f"| {'—' if ratio is None else format(ratio['time_ratio'], '.3f')} "
            f"| {_or_dash(ratio, 'train_s_to_98pct', '.0f')} "
            f"| {_or_dash(ratio, 'time_ratio_to_98pct', '.3f')} |"
        )
    return "\n".join(lines)


def softmax_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import torch

    runs_cfg = configs(args)
    cache = args.cache or paths.var("cache")
    torch.set_num_threads(args.threads)
    load_start = _load()
    started = time.perf_counter()
    train, valid, table, pseudo, data = prepare(
        args.items, args.users, args.seed, cache, args.progress, args.encoder
    )
    print(f"data: {json.dumps(data)}", flush=True)
    runs: list[dict[str, Any]] = []
    for cfg in runs_cfg:
        print(f"training {_label(cfg)} …", flush=True)
        result = run_one(
            cfg,
            train,
            valid,
            table,
            pseudo,
            epochs=args.epochs,
            seed=args.seed,
            time_budget_s=args.time_budget,
            progress=args.progress,
        )
        runs.append(result)
        print(
            f"  {result['label']}: {result['epochs']} epochs (best {result['best_epoch']}), "
            f"{result['train_s']:.0f} s training ({result['epoch_s']:.1f} s/epoch), "
            f"NDCG@10 {result['val_ndcg10']:.4f}, HR@10 {result['val_hr10']:.4f}, "
            f"load {result['loadavg_start']} → {result['loadavg_end']}",
            flush=True,
        )
    ratios = compare(runs)
    report = {
        "command": "python -m sluice.bench.softmax "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "data": data,
        "epochs_cap": args.epochs,
        "loadavg_start": load_start,
        "loadavg_end": _load(),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
        "ratios": ratios,
        "target": {"ndcg_ratio_min": TARGET_NDCG_RATIO, "time_ratio_max": TARGET_TIME_RATIO},
    }
    print(table_markdown(runs, ratios), flush=True)
    print(f"load average {load_start} → {report['loadavg_end']}", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m sluice.bench.softmax", description=__doc__)
    add_softmax_args(ap)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    return softmax_main(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
