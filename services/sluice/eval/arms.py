"""``sluice eval recommend --data DIR --arms FILE``: replay the holdout through two arms of
an experiment and report the difference with a confidence interval.

Every evaluation user's fine-ranking and re-ranking inputs are recorded once
(:mod:`sluice.eval.replay`) and ranked again with each arm's settings, as the gateway would
send them for a user in that arm (an arm with ``fusion_beta`` runs fine ranking again).
Both arms see every user, so the comparison is paired: the 95% interval of the mean
per-user difference (second arm minus first) in HR@10 and NDCG@10 comes from a paired
bootstrap over users (``scipy.stats.bootstrap``, 2,000 resamples, percentile method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import bootstrap

from sluice.domain import FineOverrides
from sluice.experiments import Experiment, read_experiments

RESAMPLES = 2000


def paired_difference(first: np.ndarray, second: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean of ``second - first`` and its 95% paired-bootstrap interval."""
    result = bootstrap(
        (first, second),
        lambda a, b, axis: np.mean(b - a, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        random_state=seed,
    )
    low, high = result.confidence_interval
    return {"difference": float(np.mean(second - first)), "low": float(low), "high": float(high)}


def pick(path: Path, name: str | None, arms: tuple[str, str] | None) -> tuple[Experiment, Any]:
    """The experiment ``name`` (default: the file's first) and its two arms to compare
    (default: its first two; a shadow arm may be named)."""
    spec = read_experiments(path)
    if not spec.experiments:
        raise ValueError(f"{path} declares no experiment")
    chosen = next((e for e in spec.experiments if name in (None, e.name)), None)
    if chosen is None:
        raise ValueError(f"{path} has no experiment {name}")
    every = [*chosen.arms, *([chosen.shadow] if chosen.shadow else [])]
    by_name = {a.name: a for a in every}
    names = arms or tuple(a.name for a in every[:2])
    if len(names) != 2 or any(n not in by_name for n in names):
        raise ValueError(f"experiment {chosen.name} has arms {sorted(by_name)}, not {names}")
    return chosen, (by_name[names[0]], by_name[names[1]])


def arms_section(
    split: Any,
    users: np.ndarray,
    path: Path,
    experiment: str | None = None,
    arms: tuple[str, str] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    from sluice.eval.replay import per_user, record_rerank_inputs, replay
    from sluice.eval.served import list_metrics

    chosen, (first, second) = pick(path, experiment, arms)
    recorded = record_rerank_inputs(split, users, threads)
    targets = split.test[users]
    out: dict[str, Any] = {"experiment": chosen.name, "users": len(users), "arms": {}}
    per: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for arm in (first, second):
        fine = arm.settings.fine()  # no fine-ranking settings: the recorded output stands
        changed = fine if fine != FineOverrides() else None
        pages = replay(split, recorded, arm.settings.overrides(), threads, changed)
        per[arm.name] = per_user(pages, targets)
        out["arms"][arm.name] = {
            "settings": arm.settings.model_dump(exclude_none=True),
            "metrics": list_metrics(pages, split, users),
        }
    out["difference"] = {
        metric: paired_difference(per[first.name][i], per[second.name][i])
        for i, metric in enumerate(("HR@10", "NDCG@10"))
    }
    print(
        f"\nexperiment {chosen.name}: {second.name} against {first.name} on {len(users)} users "
        "(paired bootstrap, 95%)\n| arm | HR@10 | NDCG@10 |\n|---|---|---|"
    )
    for name, entry in out["arms"].items():
        m = entry["metrics"]
        print(f"| {name} {entry['settings']} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} |")
    for metric, d in out["difference"].items():
        print(f"{metric}: {d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]", flush=True)
    return out
