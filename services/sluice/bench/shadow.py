"""``sluice bench shadow --artifacts DIR``: what a shadow arm adds to the served latency.

One cluster (Triton and the five services as processes) serves back-to-back Recommend
calls from one client thread, so that a shadow's background work falls on the next
request. The experiments file is rewritten between phases, with and without a shadow arm
(an exposure target), and each phase starts once a response carries the new file's
version. The phases alternate (off, on, off, on, …), so that both sides see the same host;
each phase reports its p50 and p99, and the shadow pages logged.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths


def add_shadow_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=300, help="Recommend calls per phase")
    ap.add_argument("--rounds", type=int, default=4, help="off/on phase pairs")
    ap.add_argument("--out", type=Path, default=paths.var("bench", "shadow"))


def _spec(version: str, shadow: bool) -> dict[str, Any]:
    experiment: dict[str, Any] = {"name": "bench", "salt": "s", "arms": [{"name": "control"}]}
    if shadow:
        experiment["shadow"] = {"name": "tail", "settings": {"exposure_tail_share": 0.4}}
    return {"version": version, "experiments": [experiment]}


def shadow_main(args: argparse.Namespace, argv: Any = None) -> int:
    import grpc

    from sluice.artifacts import Artifacts
    from sluice.experiments import write_experiments
    from sluice.launch import Cluster, Ports
    from sluice.v1 import storefront_pb2, storefront_pb2_grpc

    users = Artifacts(args.artifacts).users()[0]
    out: dict[str, Any] = {"requests": args.requests, "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="sluice-shadow-") as tmp:
        base = Path(tmp)
        experiments, logs = base / "experiments.json", base / "shadow"
        write_experiments(experiments, _spec("off-0", shadow=False))
        cluster = Cluster(
            artifacts=args.artifacts,
            ports=Ports.random(),
            log_dir=base / "logs",
            event_log_dir=base / "events",
            extra_env={
                "SLUICE_GATEWAY_EXPERIMENTS_FILE": str(experiments),
                "SLUICE_GATEWAY_RULES_POLL_S": "0.2",
                "SLUICE_GATEWAY_SHADOW_LOG_DIR": str(logs),
            },
        )
        cluster.start(timeout_s=600)
        stub = storefront_pb2_grpc.StorefrontServiceStub(
            grpc.insecure_channel(cluster.gateway_address)
        )

        def call(i: int) -> Any:
            request = storefront_pb2.RecommendRequest(user_id=users[i % len(users)], page_size=10)
            return stub.Recommend(request, timeout=10)

        phases: list[dict[str, Any]] = []
        try:
            for i in range(args.requests):  # warm up every user's first call
                call(i)
            for r in range(args.rounds):
                for on in (False, True):
                    version = f"{'on' if on else 'off'}-{r}"
                    write_experiments(experiments, _spec(version, shadow=on))
                    deadline = time.monotonic() + 30
                    while call(0).experiments_version != version:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the gateway never loaded {version}")
                    logged = _lines(logs)
                    latency = []
                    for i in range(args.requests):
                        t0 = time.perf_counter()
                        call(i)
                        latency.append((time.perf_counter() - t0) * 1000)
                    phases.append(
                        {
                            "shadow": on,
                            "p50_ms": float(np.percentile(latency, 50)),
                            "p99_ms": float(np.percentile(latency, 99)),
                            "shadow_pages": _lines(logs) - logged,
                        }
                    )
                    print(json.dumps(phases[-1]), flush=True)
        finally:
            cluster.stop()
    without = [p["p50_ms"] for p in phases if not p["shadow"]]
    with_shadow = [p["p50_ms"] for p in phases if p["shadow"]]
    out |= {
        "phases": phases,
        "p50_off_ms": float(np.median(without)),
        "p50_on_ms": float(np.median(with_shadow)),
        "p50_added_ms": float(np.median(np.subtract(with_shadow, without))),
        "loadavg_end": os.getloadavg(),
    }
    print(
        f"p50 without the shadow {out['p50_off_ms']:.2f} ms, with it {out['p50_on_ms']:.2f} ms: "
        f"{out['p50_added_ms']:+.2f} ms (median of {args.rounds} paired phases); "
        f"load average {out['loadavg_start'][0]:.2f} → {out['loadavg_end'][0]:.2f}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow.json").write_text(json.dumps(out, indent=1))
    return 0


def _lines(logs: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in logs.glob("shadow-*.jsonl"))
