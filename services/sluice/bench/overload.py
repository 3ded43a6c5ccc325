"""``sluice bench overload``: does admission control keep the admitted requests fast at 2x?

1. **Saturation.** Open-loop Poisson steps at the given rates (``--rates``); the saturation
   rate is the highest one whose p99 (failures counted as infinitely slow) stays within the
   default budget (250 ms), every lower step too. Its throughput is the reference.
   It is measured with admission control off: the cascade's own capacity.
2. **One continuous run**: ``--before-s`` at ``--calm-share`` of the saturation rate, then
   ``--overload-s`` at twice the saturation rate, then ``--after-s`` calm again; once with
   admission control off and once on (the default), each on a fresh cluster.

Reported (JSON and CSV under ``--out``): the admitted requests' p99 and their
DEADLINE_EXCEEDED count during the overload; the shed (RESOURCE_EXHAUSTED) share and the
server's own time on a shed request (p99 from the gateway's
``sluice_admission_shed_seconds`` histogram: the load generator shares the cores, so the
client's view of a refusal says little); goodput (answers within the budget, per second)
against the saturation throughput; the p99 before and from 2 s after the overload.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.bench.load import (
    ClientPool,
    Records,
    load_workload,
    machine_info,
    make_requests,
    percentile,
    poisson_schedule,
    started_cluster,
    write_csv,
)

OK, DEADLINE, SHED = 0, 4, 8  # gRPC status codes


def _p99_ms(rec: Records) -> float:
    """p99 latency with failed answers as infinitely slow (ms)."""
    lat = rec.latency_s.astype(np.float64).copy()
    lat[rec.code != OK] = np.inf
    return percentile(lat * 1000, 99) if len(lat) else float("nan")


def _shed_histogram(metrics_url: str) -> dict[float, float]:
    """Cumulative bucket counts of the gateway's shed-time histogram (all methods)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out: dict[float, float] = {}
    for m in re.finditer(
        r'^sluice_admission_shed_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)$', text, re.M
    ):
        le = float("inf") if m[1] == "+Inf" else float(m[1])
        out[le] = out.get(le, 0.0) + float(m[2])
    return out


def _quantile_upper_ms(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of what was observed in between."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    for b, c in zip(bounds, counts, strict=True):
        if c >= q * total:
            return b * 1000
    return float("inf")


def _run(pool: ClientPool, offsets: np.ndarray, specs: list[Any], timeout_s: float) -> Records:
    kinds = np.array([s.kind for s in specs], np.int8)
    rec, _ = pool.open_loop(
        offsets, [(s.kind, s.user_id, s.query) for s in specs], kinds, timeout_s
    )
    return rec


ADMISSION_OFF = {
    f"SLUICE_{name}_ADMISSION": "false"
    for name in ("GATEWAY", "RECALL", "COARSE", "FINE", "RERANK")
}


def _saturation(
    pool: ClientPool, args: argparse.Namespace, users: Any, words: Any, rng: Any
) -> dict[str, Any]:
    steps = []
    for rate in [float(r) for r in args.rates.split(",") if r]:
        offsets = poisson_schedule(rate, args.step_s, rng)
        specs = make_requests(len(offsets), args.search_share, users, words, rng)
        rec = _run(pool, offsets, specs, args.timeout_ms / 1000)
        t0 = float(rec.intended.min()) - float(offsets.min())
        rec = rec.select(rec.intended >= t0 + 2.0)  # the first 2 s warm the step up
        p99 = _p99_ms(rec)
        good = rec.select((rec.code == OK) & (rec.latency_s * 1000 <= args.budget_ms))
        steps.append(
            {
                "offered_qps": rate,
                "p99_ms": round(p99, 1),
                "good_qps": round(len(good) / (args.step_s - 2.0), 1),
                "errors": int((rec.code != OK).sum()),
                "n": len(rec),
            }
        )
        print(f"  {steps[-1]}", flush=True)
        time.sleep(args.pause_s)
        if p99 > args.budget_ms:
            break
    ok_prefix: list[dict[str, Any]] = []
    for step in steps:
        if step["p99_ms"] > args.budget_ms:
            break
        ok_prefix.append(step)
    if not ok_prefix:
        raise SystemExit("no step met the budget: lower --rates")
    return {
        "steps": steps,
        "rate_qps": ok_prefix[-1]["offered_qps"],
        "throughput_qps": ok_prefix[-1]["good_qps"],
    }


def _overload(
    pool: ClientPool,
    args: argparse.Namespace,
    sat: dict[str, Any],
    metrics_url: str,
    users: Any,
    words: Any,
    rng: Any,
) -> dict[str, Any]:
    calm, high = args.calm_share * sat["rate_qps"], 2.0 * sat["rate_qps"]
    phases = [(calm, args.before_s), (high, args.overload_s), (calm, args.after_s)]
    parts, start = [], 0.0
    for rate, length in phases:
        parts.append(start + poisson_schedule(rate, length, rng))
        start += length
    offsets = np.concatenate(parts)
    specs = make_requests(len(offsets), args.search_share, users, words, rng)
    print(
        f"  {calm:g} req/s for {args.before_s:g} s, {high:g} for {args.overload_s:g} s, "
        f"{calm:g} for {args.after_s:g} s …",
        flush=True,
    )
    load0 = os.getloadavg()[0]
    h0 = _shed_histogram(metrics_url)
    rec = _run(pool, offsets, specs, args.timeout_ms / 1000)
    h1 = _shed_histogram(metrics_url)
    load1 = os.getloadavg()[0]
    t0 = float(rec.intended.min()) - float(offsets.min())
    at = rec.intended - t0
    before = rec.select((at >= 2.0) & (at < args.before_s))
    o_end = args.before_s + args.overload_s
    over = rec.select((at >= args.before_s) & (at < o_end))
    after = rec.select(at >= o_end + 2.0)
    admitted = over.select(over.code != SHED)
    good = over.select((over.code == OK) & (over.latency_s * 1000 <= args.budget_ms))
    o: dict[str, Any] = {
        "calm_qps": calm,
        "overload_qps": high,
        "requests": len(over),
        "shed_share": round(float((over.code == SHED).mean()) if len(over) else 0.0, 3),
        "admitted": len(admitted),
        "admitted_p50_ms": round(percentile(admitted.latency_s * 1000, 50), 1),
        "admitted_p99_ms": round(_p99_ms(admitted), 1),
        "admitted_deadline_exceeded": int((admitted.code == DEADLINE).sum()),
        "admitted_other_errors": int(((admitted.code != OK) & (admitted.code != DEADLINE)).sum()),
        "goodput_qps": round(len(good) / args.overload_s, 1),
        "goodput_vs_saturation": round(
            len(good) / args.overload_s / max(sat["throughput_qps"], 1e-9), 3
        ),
        "shed_server_p50_ms_upper": _quantile_upper_ms(h0, h1, 0.50),
        "shed_server_p99_ms_upper": _quantile_upper_ms(h0, h1, 0.99),
        "p99_before_ms": round(_p99_ms(before), 1),
        "p99_after_ms": round(_p99_ms(after), 1),
        "loadavg": [load0, load1],
    }
    o["after_vs_before"] = round(o["p99_after_ms"] / max(o["p99_before_ms"], 1e-9), 3)
    return o


def overload_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    users, words = load_workload(args.artifacts)
    report: dict[str, Any] = {
        "command": "sluice bench overload " + " ".join(argv or []),
        "machine": machine_info(),
        "budget_ms": args.budget_ms,
    }
    # saturation, and the same overload without admission control, for contrast
    runs = [("without_admission", ADMISSION_OFF), ("with_admission", {})]
    for name, env in runs:
        print(f"== {name.replace('_', ' ')}", flush=True)
        with started_cluster(args.artifacts, extra_env=env, stages=args.stages) as cluster:
            metrics_url = f"http://127.0.0.1:{cluster.ports.metrics['gateway']}/metrics"
            target = {"kind": "gateway", "address": cluster.gateway_address, "page_size": 10}
            with ClientPool(target, args.clients) as pool:
                warm = make_requests(40, args.search_share, users, words, rng)
                pool.warm([(s.kind, s.user_id, s.query) for s in warm], 5.0)
                if "saturation" not in report:
                    report["saturation"] = _saturation(pool, args, users, words, rng)
                sat = report["saturation"]
                report[name] = _overload(pool, args, sat, metrics_url, users, words, rng)
        print(json.dumps(report[name], indent=1), flush=True)
    (out / "overload.json").write_text(json.dumps(report, indent=2, default=str))
    steps = report["saturation"]["steps"]
    write_csv(out / "saturation_steps.csv", steps, list(steps[0]))
    print(f"saturation {report['saturation']['rate_qps']:g} req/s; wrote {out / 'overload.json'}")
    return 0


def add_overload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--stages", choices=("grpc", "local"), default="grpc")
    ap.add_argument("--rates", default="10,15,20,25,30,35,40,50,60,80")
    ap.add_argument("--step-s", type=float, default=15.0, help="seconds per saturation step")
    ap.add_argument("--pause-s", type=float, default=2.0)
    ap.add_argument("--budget-ms", type=float, default=250.0, help="the default budget")
    ap.add_argument("--calm-share", type=float, default=0.7, help="before/after: share of sat.")
    ap.add_argument("--before-s", type=float, default=20.0)
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--after-s", type=float, default=20.0)
    ap.add_argument("--timeout-ms", type=float, default=1000.0, help="client deadline per call")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--search-share", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=paths.var("bench", "overload"))
