"""Open-loop load generator for the storefront API (``sluice bench load``).

How it measures
  * Arrivals are an open-loop **Poisson** process: exponential gaps at the offered rate are
    drawn *before* a step starts, and every request is sent at its precomputed time whether or
    not earlier ones have answered. The aggregate schedule is dealt round-robin to ``--clients``
    separate client **processes** (multiprocessing, spawn), each with its own gRPC channel and
    non-blocking calls (``stub.Method.future``), so a slow answer never delays the next send.
  * Latency is measured from the **intended** send time to the answer, so queueing anywhere
    (server, network, or a late client) shows up in the numbers instead of being hidden by
    coordinated omission. How late each send actually was is recorded too.
  * Each response's ``StageReport``s give the time per stage (as the gateway saw it, including
    the hop to the stage); ``duration_us`` gives the gateway's own total.
  * A request is *good* when it is OK, not degraded, and within its budget (Recommend 50 ms,
    Search 60 ms by default). A step *meets* the target when at least 99% of each kind's
    requests are good, i.e. the p99 counting errors and degraded answers as infinitely slow is
    within budget. The **saturation rate** is the highest offered rate that meets it with every
    lower step meeting it too.
  * Client check: a step is flagged when the p99 send lateness exceeds ``--max-lateness-ms`` or
    a client process used more than 80% of a core: then the client, not the server, may be the
    limit, and the run says so.

Outputs (``--out``): ``load.csv`` (one row per step and kind), ``load_requests.csv.gz`` (every
request), ``load.json`` (machine, command, saturation), ``latency_vs_load.png`` and
``stage_times.png`` (also copied to ``--figures`` with ``--tag`` as prefix).

The pure parts (schedule, percentiles, SLO and saturation logic, CSV) are unit-tested in
``tests/unit/test_bench_load.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths

KIND_RECOMMEND, KIND_SEARCH, KIND_TRITON = 0, 1, 2
KIND_NAMES = {KIND_RECOMMEND: "recommend", KIND_SEARCH: "search", KIND_TRITON: "fine_ranker"}
STAGES = ("recall", "coarse", "fine", "rerank")  # StageName 1..4
DEFAULT_BUDGETS_MS = {"recommend": 50.0, "search": 60.0}
GOOD_FRACTION = 0.99
MAX_CLIENT_CPU = 0.8
# grpc.StatusCode values without importing grpc in the parent for the pure helpers
STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}


# ---------------------------------------------------------------------------------------------
# the machine
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "SLUICE_"))
        },
    }


def cpu_busy_snapshot() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Triton's python backend stub is a child process)."""
    children = _children_map()
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def proc_usage(pids: Sequence[int]) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) summed over ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(stat[11]) + int(stat[12])) / tick
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


_SWITCH_FIELDS = ("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")


def proc_switches(pids: Sequence[int]) -> int:
    """Context switches so far, voluntary (a thread went to sleep: waiting for a lock, the
    GIL, a condition, I/O) and not (it was preempted), summed over the live threads of
    ``pids``. Their rate per request is the cost of handing a request between threads."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(_SWITCH_FIELDS):
                        total += int(line.split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total


class ServiceMonitor:
    """CPU seconds, RSS and context switches of each service process (with children) of a
    started cluster."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, tuple[float, int, int]]:
        out = {}
        for name, pid in self.pids.items():
            tree = process_tree(pid)
            out[name] = (*proc_usage(tree), proc_switches(tree))
        return out

    @staticmethod
    def delta(
        a: dict[str, tuple[float, int, int]], b: dict[str, tuple[float, int, int]], wall_s: float
    ) -> dict[str, dict[str, float]]:
        wall_s = max(wall_s, 1e-9)
        return {
            name: {
                "cpu_cores": round((b[name][0] - a[name][0]) / wall_s, 3),
                "rss_mib": round(b[name][1] / 2**20, 1),
                "switches_per_s": round((b[name][2] - a[name][2]) / wall_s, 1),
            }
            for name in b
            if name in a
        }


# ---------------------------------------------------------------------------------------------
# pure parts: schedule, request mix, statistics
def poisson_schedule(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival offsets (seconds from the step start) of a Poisson process of ``rate``/s.

    Cumulative sums of exponential gaps with mean ``1/rate``, cut at ``duration_s``.
    """
    if rate <= 0 or duration_s <= 0:
        return np.zeros(0)
    expected = rate * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, chunk))
    while times[-1] < duration_s:
        more = times[-1] + np.cumsum(rng.exponential(1.0 / rate, chunk))
        times = np.concatenate([times, more])
    return times[times < duration_s]


def deal(n: int, workers: int) -> list[np.ndarray]:
    """Round-robin assignment of ``n`` arrivals to ``workers``: the union stays the schedule."""
    return [np.arange(w, n, workers) for w in range(workers)]


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'\-]+")


@dataclass(frozen=True)
class RequestSpec:
    kind: int  # KIND_RECOMMEND or KIND_SEARCH
    user_id: str
    query: str = ""


def title_words(titles: Sequence[str]) -> list[list[str]]:
    return [_WORD.findall(t.lower()) for t in titles]


def make_requests(
    n: int,
    search_share: float,
    users: Sequence[str],
    words: Sequence[Sequence[str]],
    rng: np.random.Generator,
    max_query_words: int = 3,
) -> list[RequestSpec]:
    """``n`` requests: Search with 1..max_query_words consecutive words of a random catalog
    title, Recommend for a random build user (searches carry a user too)."""
    out = []
    kinds = rng.random(n) < search_share
    user_idx = rng.integers(0, len(users), n) if len(users) else np.zeros(n, np.int64)
    usable = [w for w in words if w]
    for i in range(n):
        user = users[int(user_idx[i])] if len(users) else ""
        if kinds[i] and usable:
            w = usable[int(rng.integers(0, len(usable)))]
            k = int(rng.integers(1, min(max_query_words, len(w)) + 1))
            s = int(rng.integers(0, len(w) - k + 1))
            out.append(RequestSpec(KIND_SEARCH, user, " ".join(w[s : s + k])))
        else:
            out.append(RequestSpec(KIND_RECOMMEND, user))
    return out


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values; inf propagates."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan")
    if np.isinf(v).any():
        # np.percentile interpolates inf - inf into nan; order statistics are well defined
        v = np.sort(v)
        pos = (len(v) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        if math.isinf(v[hi]) or math.isinf(v[lo]):
            return float(v[hi]) if pos > lo else float(v[lo])
        return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return float(np.percentile(v, q))


@dataclass
class Records:
    """Every request of a run as parallel arrays (times: seconds, monotonic clock)."""

    intended: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sent: np.ndarray = field(default_factory=lambda: np.zeros(0))
    done: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    code: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    degraded: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    stage_us: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    server_us: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.intended)

    @classmethod
    def concat(cls, parts: Sequence[Records]) -> Records:
        if not parts:
            return cls()
        return cls(
            **{
                name: np.concatenate([getattr(p, name) for p in parts])
                for name in cls.__dataclass_fields__
            }
        )

    def select(self, mask: np.ndarray) -> Records:
        return Records(**{name: getattr(self, name)[mask] for name in self.__dataclass_fields__})

    @property
    def latency_s(self) -> np.ndarray:
        return self.done - self.intended

    @property
    def lateness_s(self) -> np.ndarray:
        return self.sent - self.intended


def good_mask(rec: Records, budget_s: float) -> np.ndarray:
    """OK, not degraded, and answered within ``budget_s`` of the intended send time."""
    return (rec.code == 0) & ~rec.degraded & (rec.latency_s <= budget_s)


def slo_latency(rec: Records) -> np.ndarray:
    """Latency with failed and degraded answers counted as infinitely slow."""
    lat = rec.latency_s.astype(np.float64).copy()
    lat[(rec.code != 0) | rec.degraded] = np.inf
    return lat


def meets_budget(rec: Records, budget_s: float, good_fraction: float = GOOD_FRACTION) -> bool:
    """At least ``good_fraction`` of the requests are good (no requests: vacuously true)."""
    if len(rec) == 0:
        return True
    return float(good_mask(rec, budget_s).mean()) >= good_fraction


def saturation(rates: Sequence[float], meets: Sequence[bool]) -> tuple[float, float]:
    """(highest rate meeting the target below the first failing one, first failing rate).

    Steps are ordered by rate. 0.0 when even the lowest step fails; ``inf`` as the second
    value when no step fails.
    """
    order = np.argsort(np.asarray(rates, dtype=np.float64), kind="stable")
    last_ok, first_bad = 0.0, math.inf
    for i in order:
        if meets[i]:
            last_ok = float(rates[i])
        else:
            first_bad = float(rates[i])
            break
    return last_ok, first_bad


def next_rate(
    tested: dict[float, bool],
    start: float,
    step: float,
    max_rate: float,
    refine: int = 2,
    stop_after: int = 1,
) -> float | None:
    """The next offered rate to try, or None when done.

    Steps up the grid ``start, start + step, ...`` (at most ``max_rate``) until ``stop_after``
    grid steps have failed, then bisects ``refine`` times between the highest rate meeting the
    target (below the first failure) and the first failing rate.
    """
    if not tested:
        return start

    def on_grid(r: float) -> bool:
        k = (r - start) / step
        return abs(k - round(k)) < 1e-6 and k >= -1e-9

    grid = [r for r in tested if on_grid(r)]
    if sum(1 for r in grid if not tested[r]) < stop_after:
        nxt = max(grid) + step
        if nxt <= max_rate + 1e-9:
            return nxt
    rates = sorted(tested)
    ok, bad = saturation(rates, [tested[r] for r in rates])
    if math.isinf(bad) or len(tested) - len(grid) >= refine:
        return None
    mid = round((ok + bad) / 2.0, 1)
    if mid <= ok or mid >= bad or mid in tested:
        return None
    return mid


CSV_FIELDS = [
    "tag",
    "step",
    "offered_qps",
    "kind",
    "budget_ms",
    "requests",
    "achieved_qps",
    "ok",
    "errors",
    "errors_by_code",
    "degraded",
    "good_pct",
    "meets",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "p99_slo_ms",
    *[f"{s}_{q}_ms" for s in STAGES for q in ("p50", "p95", "p99")],
    "gateway_own_p50_ms",
    "transport_p50_ms",
    "lateness_p50_ms",
    "lateness_p99_ms",
    "lateness_max_ms",
    "client_cpu_max",
    "client_ok",
    "machine_busy_pct",
    "loadavg1",
]


def _ms(x: float) -> float:
    return round(x * 1000.0, 3) if math.isfinite(x) else x


def step_rows(
    rec: Records,
    *,
    tag: str,
    step: int,
    offered: float,
    window: tuple[float, float],
    budgets_ms: dict[str, float],
    client_cpu_max: float = 0.0,
    max_lateness_ms: float = 5.0,
    machine_busy_pct: float = float("nan"),
    loadavg1: float = float("nan"),
) -> list[dict[str, Any]]:
    """Rows of ``CSV_FIELDS`` for one step: one per kind present plus ``all``.

    ``rec`` holds the step's requests whose intended time lies in ``window`` (warm-up cut).
    """
    t_lo, t_hi = window
    span = max(t_hi - t_lo, 1e-9)
    kinds = sorted({int(k) for k in rec.kind.tolist()})
    rows: list[dict[str, Any]] = []
    lateness_all = rec.lateness_s
    late_p99 = percentile(lateness_all, 99)
    client_ok = (not (late_p99 * 1000.0 > max_lateness_ms)) and client_cpu_max <= MAX_CLIENT_CPU
    per_kind_meets: list[bool] = []
    for label, mask in [
        *[(KIND_NAMES[k], rec.kind == k) for k in kinds],
        ("all", np.ones(len(rec), bool)),
    ]:
        r = rec.select(mask)
        ok = r.code == 0
        okr = r.select(ok & ~r.degraded) if len(r) else r
        lat = okr.latency_s
        if label == "all":
            budget = float("nan")
            meets = all(per_kind_meets) if per_kind_meets else True
            slo = float("nan")
        else:
            budget = budgets_ms.get(label, float("nan"))
            meets = meets_budget(r, budget / 1000.0) if math.isfinite(budget) else True
            per_kind_meets.append(meets)
            slo = percentile(slo_latency(r), 99)
        good = good_mask(r, budget / 1000.0).mean() * 100 if len(r) and math.isfinite(budget) else 0
        codes: dict[str, int] = {}
        for c in r.code[~ok].tolist():
            name = STATUS_NAMES.get(int(c), str(c))
            codes[name] = codes.get(name, 0) + 1
        in_window = (r.done >= t_lo) & (r.done < t_hi) & ok
        row: dict[str, Any] = {
            "tag": tag,
            "step": step,
            "offered_qps": offered,
            "kind": label,
            "budget_ms": budget,
            "requests": len(r),
            "achieved_qps": round(float(in_window.sum()) / span, 2),
            "ok": int(ok.sum()),
            "errors": int((~ok).sum()),
            "errors_by_code": ";".join(f"{k}:{v}" for k, v in sorted(codes.items())),
            "degraded": int((r.degraded & ok).sum()),
            "good_pct": round(float(good), 2),
            "meets": bool(meets),
            "p50_ms": _ms(percentile(lat, 50)),
            "p95_ms": _ms(percentile(lat, 95)),
            "p99_ms": _ms(percentile(lat, 99)),
            "max_ms": _ms(float(lat.max())) if len(lat) else float("nan"),
            "p99_slo_ms": _ms(slo),
        }
        stage_s = okr.stage_us / 1e6
        for j, s in enumerate(STAGES):
            for q in (50, 95, 99):
                row[f"{s}_p{q}_ms"] = _ms(percentile(stage_s[:, j], q)) if len(okr) else math.nan
        own = (okr.server_us - okr.stage_us.sum(axis=1)) / 1e6
        transport = (okr.done - okr.sent) - okr.server_us / 1e6
        row["gateway_own_p50_ms"] = _ms(percentile(own, 50))
        row["transport_p50_ms"] = _ms(percentile(transport, 50))
        late = r.lateness_s
        row["lateness_p50_ms"] = _ms(percentile(late, 50))
        row["lateness_p99_ms"] = _ms(percentile(late, 99))
        row["lateness_max_ms"] = _ms(float(late.max())) if len(late) else float("nan")
        row["client_cpu_max"] = round(client_cpu_max, 3)
        row["client_ok"] = bool(client_ok)
        row["machine_busy_pct"] = round(machine_busy_pct, 1)
        row["loadavg1"] = round(loadavg1, 2)
        rows.append(row)
    return rows


def write_csv(
    path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] = CSV_FIELDS
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_requests(path: Path, rec: Records, steps: np.ndarray, offered: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "step",
                "offered_qps",
                "kind",
                "code",
                "degraded",
                "intended_s",
                "lateness_ms",
                "latency_ms",
                *[f"{s}_ms" for s in STAGES],
                "server_ms",
            ]
        )
        t0 = float(rec.intended.min()) if len(rec) else 0.0
        for i in range(len(rec)):
            w.writerow(
                [
                    int(steps[i]),
                    float(offered[i]),
                    KIND_NAMES.get(int(rec.kind[i]), "?"),
                    STATUS_NAMES.get(int(rec.code[i]), int(rec.code[i])),
                    int(rec.degraded[i]),
                    round(float(rec.intended[i] - t0), 6),
                    round(float(rec.lateness_s[i]) * 1000, 3),
                    round(float(rec.latency_s[i]) * 1000, 3),
                    *[round(float(x) / 1000, 3) for x in rec.stage_us[i]],
                    round(float(rec.server_us[i]) / 1000, 3),
                ]
            )


# ---------------------------------------------------------------------------------------------
# client processes
def _code_of(err: BaseException) -> int:
    import grpc

    from sluice.core.errors import SluiceError

    if isinstance(err, grpc.Call):
        return int(err.code().value[0])
    if isinstance(err, SluiceError):
        return int(err.code.value[0])
    return 2


class _Results:
    def __init__(self, n: int) -> None:
        self.sent = np.full(n, np.nan)
        self.done = np.full(n, np.nan)
        self.code = np.zeros(n, np.int16)
        self.degraded = np.zeros(n, bool)
        self.stage_us = np.zeros((n, 4), np.int64)
        self.server_us = np.zeros(n, np.int64)
        self.remaining = n
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        if n == 0:
            self.all_done.set()

    def finish(self) -> None:
        with self.lock:
            self.remaining -= 1
            if self.remaining == 0:
                self.all_done.set()


class GatewayDriver:
    """Sends Search/Recommend with ``future`` calls on one channel (no thread per request)."""

    def __init__(self, address: str, page_size: int = 10) -> None:
        import grpc

        from sluice.v1 import storefront_pb2, storefront_pb2_grpc

        self._pb = storefront_pb2
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        )
        self.stub = storefront_pb2_grpc.StorefrontServiceStub(self.channel)
        self.page_size = page_size

    def request(self, spec: tuple[int, str, str]) -> Any:
        """The SearchRequest or RecommendRequest a workload entry (kind, user, query) sends."""
        kind, user, query = spec
        pb = self._pb
        if kind == KIND_SEARCH:
            return pb.SearchRequest(query=query, user_id=user, page_size=self.page_size)
        return pb.RecommendRequest(user_id=user, surface=pb.SURFACE_HOME, page_size=self.page_size)

    def _request(self, spec: tuple[int, str, str]) -> tuple[Callable[..., Any], Any]:
        call = self.stub.Search if spec[0] == KIND_SEARCH else self.stub.Recommend
        return call.future, self.request(spec)

    def warm(self, specs: Sequence[tuple[int, str, str]], timeout_s: float) -> None:
        for spec in specs:
            call, req = self._request(spec)
            with contextlib.suppress(Exception):
                call(req, timeout=timeout_s).result()

    def open_loop(
        self,
        t0: float,
        offsets: np.ndarray,
        specs: Sequence[tuple[int, str, str]],
        timeout_s: float,
    ) -> _Results:
        n = len(offsets)
        res = _Results(n)
        calls = [self._request(s) for s in specs]  # built before the clock starts

        def on_done(i: int, fut: Any) -> None:
            res.done[i] = time.monotonic()
            try:
                resp = fut.result()
                for st in resp.stages:
                    if 1 <= st.stage <= 4:
                        res.stage_us[i, st.stage - 1] = st.duration_us
                    if st.degraded:
                        res.degraded[i] = True
                res.server_us[i] = resp.duration_us
            except Exception as err:  # grpc.RpcError
                res.code[i] = _code_of(err)
            res.finish()

        for i in range(n):
            target = t0 + offsets[i]
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            call, req = calls[i]
            res.sent[i] = time.monotonic()
            fut = call(req, timeout=timeout_s)
            fut.add_done_callback(lambda f, i=i: on_done(i, f))
        res.all_done.wait(timeout_s + 30.0)
        return res

    def close(self) -> None:
        self.channel.close()


class TritonDriver:
    """Calls the fine ranker on Triton through the project's :class:`TritonBackend`."""

    def __init__(self, url: str, tensors: list[tuple[np.ndarray, ...]], threads: int = 64) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from sluice.fine.backend import TritonBackend

        self.backend = TritonBackend(url)
        self.tensors = tensors
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def _call(self, res: _Results, i: int, payload: int, timeout_s: float) -> None:
        res.sent[i] = time.monotonic()
        try:
            h, c, q, m = self.tensors[payload % len(self.tensors)]
            self.backend.score(h, c, q, m, timeout_s=timeout_s)
        except Exception as err:
            res.code[i] = _code_of(err)
        res.done[i] = time.monotonic()
        res.finish()

    def warm(self, specs: Sequence[int], timeout_s: float) -> None:
        for p in specs:
            with contextlib.suppress(Exception):
                h, c, q, m = self.tensors[p % len(self.tensors)]
                self.backend.score(h, c, q, m, timeout_s=timeout_s)

    def open_loop(
        self, t0: float, offsets: np.ndarray, specs: Sequence[int], timeout_s: float
    ) -> _Results:
        n = len(offsets)
        res = _Results(n)
        for i in range(n):
            delay = t0 + offsets[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.pool.submit(self._call, res, i, int(specs[i]), timeout_s)
        res.all_done.wait(timeout_s + 30.0)
        return res

    def closed_loop(
        self, t0: float, concurrency: int, duration_s: float, timeout_s: float
    ) -> tuple[list[float], list[float], list[int]]:
        """``concurrency`` threads each sending back to back until ``t0 + duration_s``."""
        starts: list[float] = []
        ends: list[float] = []
        codes: list[int] = []
        lock = threading.Lock()

        def loop(k: int) -> None:
            j = k
            while True:
                now = time.monotonic()
                if now >= t0 + duration_s:
                    return
                code = 0
                try:
                    h, c, q, m = self.tensors[j % len(self.tensors)]
                    self.backend.score(h, c, q, m, timeout_s=timeout_s)
                except Exception as err:
                    code = _code_of(err)
                end = time.monotonic()
                with lock:
                    starts.append(now)
                    ends.append(end)
                    codes.append(code)
                j += concurrency

        delay = t0 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return starts, ends, codes

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def _worker_main(conn: Connection, target: dict[str, Any]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    driver: GatewayDriver | TritonDriver
    if target["kind"] == "gateway":
        driver = GatewayDriver(target["address"], target.get("page_size", 10))
    else:
        driver = TritonDriver(target["url"], target["tensors"], target.get("threads", 64))
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        op = msg["op"]
        if op == "warm":
            driver.warm(msg["specs"], msg["timeout_s"])
            conn.send(("warm", None))
            continue
        ru0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        if op == "open":
            res = driver.open_loop(msg["t0"], msg["offsets"], msg["specs"], msg["timeout_s"])
            payload: dict[str, Any] = {
                "sent": res.sent,
                "done": res.done,
                "code": res.code,
                "degraded": res.degraded,
                "stage_us": res.stage_us,
                "server_us": res.server_us,
            }
        else:  # closed loop (triton only)
            assert isinstance(driver, TritonDriver)
            s, e, c = driver.closed_loop(
                msg["t0"], msg["concurrency"], msg["duration_s"], msg["timeout_s"]
            )
            payload = {"sent": np.asarray(s), "done": np.asarray(e), "code": np.asarray(c)}
        ru1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        payload["cpu_frac"] = cpu / max(w1 - w0, 1e-9)
        conn.send(("result", payload))
    driver.close()


class ClientPool:
    """``n`` client processes, each with its own channel, driven step by step."""

    def __init__(self, target: dict[str, Any], n: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, target), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            tag, _ = c.recv()
            assert tag == "ready"

    def __len__(self) -> int:
        return len(self.conns)

    def warm(self, specs: Sequence[Any], timeout_s: float) -> None:
        for i, c in enumerate(self.conns):
            c.send(
                {"op": "warm", "specs": list(specs[i :: len(self.conns)]), "timeout_s": timeout_s}
            )
        for c in self.conns:
            c.recv()

    def open_loop(
        self,
        offsets: np.ndarray,
        specs: Sequence[Any],
        kinds: np.ndarray,
        timeout_s: float,
        lead_s: float = 1.0,
    ) -> tuple[Records, list[float]]:
        """Run one schedule; returns the records (intended order) and each client's CPU share."""
        n = len(offsets)
        parts = deal(n, len(self.conns))
        t0 = time.monotonic() + lead_s
        for c, idx in zip(self.conns, parts, strict=True):
            c.send(
                {
                    "op": "open",
                    "t0": t0,
                    "offsets": offsets[idx],
                    "specs": [specs[i] for i in idx.tolist()],
                    "timeout_s": timeout_s,
                }
            )
        recs, cpus = [], []
        for c, idx in zip(self.conns, parts, strict=True):
            _, p = c.recv()
            cpus.append(float(p["cpu_frac"]))
            recs.append(
                Records(
                    intended=t0 + offsets[idx],
                    sent=p["sent"],
                    done=p["done"],
                    kind=kinds[idx].astype(np.int8),
                    code=p["code"],
                    degraded=p["degraded"],
                    stage_us=p["stage_us"],
                    server_us=p["server_us"],
                )
            )
        rec = Records.concat(recs)
        order = np.argsort(rec.intended, kind="stable")
        return rec.select(order), cpus

    def closed_loop(
        self, concurrency: int, duration_s: float, timeout_s: float, lead_s: float = 1.0
    ) -> tuple[Records, list[float], float]:
        """``concurrency`` back-to-back callers spread over the processes (Triton only)."""
        share = [concurrency // len(self.conns)] * len(self.conns)
        for i in range(concurrency % len(self.conns)):
            share[i] += 1
        t0 = time.monotonic() + lead_s
        for c, k in zip(self.conns, share, strict=True):
            c.send(
                {
                    "op": "closed",
                    "t0": t0,
                    "concurrency": k,
                    "duration_s": duration_s,
                    "timeout_s": timeout_s,
                }
            )
        recs, cpus = [], []
        for c in self.conns:
            _, p = c.recv()
            cpus.append(float(p["cpu_frac"]))
            n = len(p["sent"])
            recs.append(
                Records(
                    intended=p["sent"],
                    sent=p["sent"],
                    done=p["done"],
                    kind=np.full(n, KIND_TRITON, np.int8),
                    code=p["code"].astype(np.int16),
                    degraded=np.zeros(n, bool),
                    stage_us=np.zeros((n, 4), np.int64),
                    server_us=np.zeros(n, np.int64),
                )
            )
        return Records.concat(recs), cpus, t0

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# cluster
def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--env needs KEY=VALUE, got {p!r}")
        env[key] = value
    return env


def apply_env(pairs: Sequence[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` for everything this run starts: set in this process's environment,
    which Triton (``triton_env``) and the services (``Cluster``) inherit."""
    env = parse_env(pairs)
    os.environ.update(env)
    return env


@contextlib.contextmanager
def started_cluster(
    artifacts: Path,
    extra_env: dict[str, str] | None = None,
    gpu: bool = False,
    fine_backend: str = "triton",
    log_dir: Path | None = None,
    timeout_s: float = 420.0,
    stages: str = "grpc",
    retries: int = 1,
    layout: Mapping[str, int] | None = None,
) -> Iterator[Any]:
    """A fresh :class:`~sluice.launch.Cluster` on random ports (events to a temp dir);
    ``layout`` sets its ``replicas``, ``stage_replicas``, ``recall_shards`` and ``pin_cpus``
    (0 or 1)."""
    from sluice.launch import Cluster, Ports

    env = dict(extra_env or {})  # FAISS on GPU: SLUICE_RECALL_USE_GPU=1 in the environment
    from sluice.launch import StartupError

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        for attempt in range(1 + retries):
            cluster = Cluster(
                artifacts=artifacts,
                ports=Ports.random(),
                log_dir=log_dir or Path(tmp) / f"logs{attempt}",
                event_log_dir=Path(tmp) / f"events{attempt}",
                fine_backend=fine_backend,
                extra_env=env,
                triton_gpu=gpu,
                stages=stages,
                replicas=(layout or {}).get("replicas", 1),
                stage_replicas=(layout or {}).get("stage_replicas", 0),
                recall_shards=(layout or {}).get("recall_shards", 0),
                pin_cpus=bool((layout or {}).get("pin_cpus", 0)),
            )
            t = time.monotonic()
            try:
                cluster.start(timeout_s=timeout_s, progress=True)
                break
            except StartupError as err:
                # seen on the busy host: Triton's python backend stub hanging in model
                # initialisation (idle, no progress); a fresh start gets past it
                print(
                    f"  cluster did not start ({str(err).splitlines()[0]}); "
                    f"attempt {attempt + 1} of {1 + retries}",
                    flush=True,
                )
                if attempt == retries:
                    raise
        print(f"  cluster up in {time.monotonic() - t:.0f} s", flush=True)
        try:
            yield cluster
        finally:
            cluster.stop()


def cluster_pids(cluster: Any) -> dict[str, int]:
    return {name: proc.pid for name, proc in cluster.processes.items()}


# ---------------------------------------------------------------------------------------------
# the load run
@dataclass
class LoadConfig:
    rates: list[float] | None = None  # explicit rates; None: step up from start
    start: float = 10.0
    step: float = 10.0
    max_rate: float = 400.0
    refine: int = 2
    stop_after: int = 1
    duration_s: float = 20.0
    warmup_s: float = 2.0
    pause_s: float = 2.0
    search_share: float = 0.5
    clients: int = 2
    timeout_s: float = 1.0
    budgets_ms: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BUDGETS_MS))
    max_lateness_ms: float = 5.0
    seed: int = 0
    tag: str = "load"
    page_size: int = 10


@dataclass
class LoadResult:
    rows: list[dict[str, Any]]
    records: Records
    step_of: np.ndarray
    offered_of: np.ndarray
    saturation: dict[str, Any]
    services: list[dict[str, Any]]


def load_workload(artifacts: Path) -> tuple[list[str], list[list[str]]]:
    from sluice.artifacts import Artifacts

    a = Artifacts(artifacts)
    users, _ = a.users()
    return users, title_words(a.catalog.titles)


def run_load(
    address: str,
    users: Sequence[str],
    words: Sequence[Sequence[str]],
    cfg: LoadConfig,
    monitor: ServiceMonitor | None = None,
    log: Callable[[str], None] = print,
) -> LoadResult:
    rng = np.random.default_rng(cfg.seed)
    rows: list[dict[str, Any]] = []
    parts: list[Records] = []
    steps: list[np.ndarray] = []
    offered_all: list[np.ndarray] = []
    services: list[dict[str, Any]] = []
    tested: dict[float, bool] = {}
    target = {"kind": "gateway", "address": address, "page_size": cfg.page_size}
    with ClientPool(target, cfg.clients) as pool:
        warm = make_requests(max(20, 4 * cfg.clients), cfg.search_share, users, words, rng)
        pool.warm([(s.kind, s.user_id, s.query) for s in warm], cfg.timeout_s * 5)
        step = 0
        explicit = list(cfg.rates) if cfg.rates else None
        while True:
            if explicit is not None:
                if not explicit:
                    break
                rate = explicit.pop(0)
            else:
                nxt = next_rate(
                    tested, cfg.start, cfg.step, cfg.max_rate, cfg.refine, cfg.stop_after
                )
                if nxt is None:
                    break
                rate = nxt
            offsets = poisson_schedule(rate, cfg.duration_s, rng)
            specs = make_requests(len(offsets), cfg.search_share, users, words, rng)
            kinds = np.array([s.kind for s in specs], np.int8)
            log(
                f"step {step}: {rate:g} req/s offered for {cfg.duration_s:g} s "
                f"({len(offsets)} requests, {len(pool)} client processes) …"
            )
            b0 = cpu_busy_snapshot()
            s0 = monitor.sample() if monitor else None
            w0 = time.monotonic()
            rec, cpus = pool.open_loop(
                offsets, [(s.kind, s.user_id, s.query) for s in specs], kinds, cfg.timeout_s
            )
            wall = time.monotonic() - w0
            b1 = cpu_busy_snapshot()
            busy = 100.0 * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1e-9)
            if monitor and s0 is not None:
                usage = ServiceMonitor.delta(s0, monitor.sample(), wall)
                answered = max(int(np.isfinite(rec.done).sum()), 1)
                for u in usage.values():
                    # CPU time per request: close to the intrinsic cost even on a busy host
                    u["cpu_ms_per_request"] = round(u["cpu_cores"] * wall / answered * 1000, 2)
                    u["switches_per_request"] = round(u["switches_per_s"] * wall / answered, 1)
                services.append({"step": step, "offered_qps": rate, **usage})
            t_start = float(rec.intended.min()) - float(offsets.min()) if len(rec) else 0.0
            window = (t_start + cfg.warmup_s, t_start + cfg.duration_s)
            measured = rec.select(rec.intended >= window[0])
            new_rows = step_rows(
                measured,
                tag=cfg.tag,
                step=step,
                offered=rate,
                window=window,
                budgets_ms=cfg.budgets_ms,
                client_cpu_max=max(cpus) if cpus else 0.0,
                max_lateness_ms=cfg.max_lateness_ms,
                machine_busy_pct=busy,
                loadavg1=os.getloadavg()[0],
            )
            rows += new_rows
            parts.append(rec)
            steps.append(np.full(len(rec), step))
            offered_all.append(np.full(len(rec), rate))
            log(format_step(new_rows, services[-1] if monitor and services else None))
            all_row = new_rows[-1]
            tested[rate] = bool(all_row["meets"])
            if not all_row["client_ok"]:
                log(
                    "  ! client check failed: send lateness p99 "
                    f"{all_row['lateness_p99_ms']} ms (limit {cfg.max_lateness_ms} ms), client CPU "
                    f"max {all_row['client_cpu_max']:.0%} of a core: this step may measure the "
                    "load generator, not the server"
                )
            step += 1
            time.sleep(cfg.pause_s)
    rates = sorted(tested)
    ok, bad = saturation(rates, [tested[r] for r in rates])
    sat = {"saturation_qps": ok, "first_failing_qps": bad if math.isfinite(bad) else None}
    for kind in ("recommend", "search"):
        kr = [r for r in rows if r["kind"] == kind]
        if kr:
            kr_rates = [float(r["offered_qps"]) for r in kr]
            k_ok, k_bad = saturation(kr_rates, [bool(r["meets"]) for r in kr])
            sat[f"{kind}_saturation_qps"] = k_ok
            sat[f"{kind}_first_failing_qps"] = k_bad if math.isfinite(k_bad) else None
    return LoadResult(
        rows,
        Records.concat(parts),
        np.concatenate(steps) if steps else np.zeros(0),
        np.concatenate(offered_all) if offered_all else np.zeros(0),
        sat,
        services,
    )


def format_step(rows: Sequence[dict[str, Any]], usage: dict[str, Any] | None) -> str:
    all_row = rows[-1]
    parts = [
        f"  achieved {all_row['achieved_qps']:.1f}/s",
        f"errors {all_row['errors']}"
        + (f" ({all_row['errors_by_code']})" if all_row["errors"] else ""),
        f"degraded {all_row['degraded']}",
    ]
    for r in rows[:-1]:
        parts.append(
            f"{r['kind']} p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms "
            f"[{'ok' if r['meets'] else 'OVER'} {r['budget_ms']:g}]"
        )
    parts.append(
        f"late p99 {all_row['lateness_p99_ms']:.1f} ms, "
        f"client cpu {all_row['client_cpu_max']:.0%}, "
        f"machine {all_row['machine_busy_pct']:.0f}% busy, load {all_row['loadavg1']:.1f}"
    )
    line = " | ".join(parts)
    if usage:
        svc = {k: v for k, v in usage.items() if isinstance(v, dict)}
        cores = ", ".join(f"{k} {v['cpu_cores']:.2f}" for k, v in svc.items())
        per_req = ", ".join(f"{k} {v.get('cpu_ms_per_request', 0):.1f}" for k, v in svc.items())
        total = sum(v.get("cpu_ms_per_request", 0) for v in svc.values())
        line += f"\n  service CPU (cores): {cores}"
        line += f"\n  service CPU ms per request: {per_req} (sum {total:.1f})"
        switches = ", ".join(
            f"{k} {v['switches_per_request']:.1f}"
            for k, v in svc.items()
            if "switches_per_request" in v
        )
        if switches:
            line += f"\n  context switches per request: {switches}"
    return line


# ---------------------------------------------------------------------------------------------
# plots
def plot_load(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    kinds = [k for k in ("recommend", "search", "fine_ranker") if any(r["kind"] == k for r in rows)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"recommend": "tab:blue", "search": "tab:orange", "fine_ranker": "tab:green"}
    for k in kinds:
        kr = sorted((r for r in rows if r["kind"] == k), key=lambda r: float(r["offered_qps"]))
        x = [float(r["offered_qps"]) for r in kr]
        for q, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
            ax.plot(
                x,
                [float(r[f"{q}_ms"]) for r in kr],
                style,
                marker="o",
                ms=3,
                color=colors[k],
                label=f"{k} {q}",
            )
        bad = [(xx, float(r["p99_ms"])) for xx, r in zip(x, kr, strict=True) if not r["meets"]]
        if bad:
            ax.scatter(*zip(*bad, strict=True), marker="x", s=60, color="red", zorder=5)
        budget = float(kr[0]["budget_ms"]) if kr else float("nan")
        if math.isfinite(budget):
            ax.axhline(budget, color=colors[k], lw=0.8, alpha=0.6)
            ax.text(
                x[0], budget, f" {k} budget {budget:g} ms", color=colors[k], va="bottom", fontsize=8
            )
    ax.set_xlabel("offered load (req/s, Poisson)")
    ax.set_ylabel("latency from intended send (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("latency vs offered load (x: step misses the target)")
    all_rows = sorted(
        (r for r in rows if r["kind"] == "all"), key=lambda r: float(r["offered_qps"])
    )
    x = [float(r["offered_qps"]) for r in all_rows]
    ax2.plot(x, x, ":", color="gray", label="offered")
    ax2.plot(x, [float(r["achieved_qps"]) for r in all_rows], marker="o", label="achieved (OK)")
    ax2.set_xlabel("offered load (req/s)")
    ax2.set_ylabel("req/s")
    ax3 = ax2.twinx()
    ax3.plot(
        x,
        [float(r["machine_busy_pct"]) for r in all_rows],
        "--",
        color="tab:red",
        label="machine CPU busy %",
    )
    ax3.set_ylabel("machine CPU busy (%)")
    ax3.set_ylim(0, 105)
    ax2.legend(loc="upper left", fontsize=8)
    ax3.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.set_title("throughput and CPU")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = out / "latency_vs_load.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    if not any(r["kind"] in ("recommend", "search") for r in rows):
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    comps = [
        ("lateness_p50_ms", "client send lateness"),
        ("transport_p50_ms", "client↔gateway gRPC + queue"),
        ("gateway_own_p50_ms", "gateway own (encode query, history)"),
        ("recall_p50_ms", "recall"),
        ("coarse_p50_ms", "coarse"),
        ("fine_p50_ms", "fine (incl. Triton)"),
        ("rerank_p50_ms", "rerank"),
    ]
    for ax, k in zip(axes, ("recommend", "search"), strict=True):
        kr = sorted((r for r in rows if r["kind"] == k), key=lambda r: float(r["offered_qps"]))
        if not kr:
            ax.set_visible(False)
            continue
        labels = [f"{float(r['offered_qps']):g}" for r in kr]
        bottom = np.zeros(len(kr))
        for key, name in comps:
            vals = np.array([max(float(r[key]), 0.0) if r[key] == r[key] else 0.0 for r in kr])
            ax.bar(labels, vals, bottom=bottom, label=name)
            bottom += vals
        ax.plot(labels, [float(r["p50_ms"]) for r in kr], "k_", ms=18, label="measured p50")
        ax.plot(labels, [float(r["p99_ms"]) for r in kr], "rv", label="measured p99")
        ax.axhline(float(kr[0]["budget_ms"]), color="red", lw=0.8, ls="--", label="budget")
        ax.set_title(f"{k}: median time per stage")
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = out / "stage_times.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def copy_figures(paths: Sequence[Path], figures: Path | None, tag: str) -> list[Path]:
    if figures is None:
        return []
    figures.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        dst = figures / f"{tag}-{p.name}"
        shutil.copy2(p, dst)
        out.append(dst)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
def add_load_args(ap: argparse.ArgumentParser) -> None:
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="a running gateway, host:port")
    where.add_argument("--start", action="store_true", help="start Triton + all services first")
    ap.add_argument(
        "--artifacts",
        type=Path,
        required=True,
        help="the build the cluster serves (users and titles are drawn from it)",
    )
    ap.add_argument("--rates", default="", help="explicit offered rates, e.g. 10,20,50")
    ap.add_argument("--start-rate", type=float, default=10.0)
    ap.add_argument("--step", type=float, default=10.0)
    ap.add_argument("--max-rate", type=float, default=400.0)
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after the first break")
    ap.add_argument("--stop-after", type=int, default=1, help="failing grid steps before refining")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per step")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds cut from each step's start")
    ap.add_argument("--pause", type=float, default=2.0, help="idle seconds between steps")
    ap.add_argument("--search-share", type=float, default=0.5, help="share of Search requests")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--timeout-ms", type=float, default=1000.0, help="client deadline per call")
    ap.add_argument("--budget-recommend-ms", type=float, default=50.0)
    ap.add_argument("--budget-search-ms", type=float, default=60.0)
    ap.add_argument("--max-lateness-ms", type=float, default=5.0)
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for Triton and the services (repeatable)",
    )
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="Triton with the KIND_GPU config (FAISS on GPU: set SLUICE_RECALL_USE_GPU=1)",
    )
    ap.add_argument("--fine-backend", choices=("triton", "onnx", "torch"), default="triton")
    ap.add_argument(
        "--stages",
        choices=("grpc", "local"),
        default="grpc",
        help="local: one gateway process runs the stages (only Triton beside it)",
    )
    ap.add_argument(
        "--replicas", type=int, default=1, help="with --start: gateways (behind HAProxy if > 1)"
    )
    ap.add_argument("--stage-replicas", type=int, default=0, help="with --start: per stage")
    ap.add_argument(
        "--recall-shards", type=int, default=0, help="with --start: recall shards (sluice shard)"
    )
    ap.add_argument(
        "--pin-cpus",
        action="store_true",
        help="with --start --stages local: each gateway on a core of its own, as sluice up "
        "--pin-cpus",
    )
    ap.add_argument("--out", type=Path, default=paths.var("bench", "load"))
    ap.add_argument("--figures", type=Path, default=None, help="also copy the PNGs here")
    ap.add_argument("--tag", default="load", help="label in the CSV and figure names")
    ap.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        rates=[float(x) for x in args.rates.split(",") if x] or None,
        start=args.start_rate,
        step=args.step,
        max_rate=args.max_rate,
        refine=args.refine,
        stop_after=args.stop_after,
        duration_s=args.duration,
        warmup_s=args.warmup,
        pause_s=args.pause,
        search_share=args.search_share,
        clients=args.clients,
        timeout_s=args.timeout_ms / 1000.0,
        budgets_ms={"recommend": args.budget_recommend_ms, "search": args.budget_search_ms},
        max_lateness_ms=args.max_lateness_ms,
        seed=args.seed,
        tag=args.tag,
    )


def load_main(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    if args.pin_cpus and not (args.start and args.stages == "local"):
        raise SystemExit("--pin-cpus needs --start --stages local (the one-machine layout)")
    cfg = config_from_args(args)
    env = apply_env(args.env)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg']}; "
        f"artifacts {args.artifacts}",
        flush=True,
    )
    users, words = load_workload(args.artifacts)
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    with contextlib.ExitStack() as stack:
        monitor = None
        if args.start:
            print("starting Triton and the services …", flush=True)
            cluster = stack.enter_context(
                started_cluster(
                    args.artifacts,
                    env,
                    args.gpu,
                    args.fine_backend,
                    stages=args.stages,
                    layout={
                        "replicas": args.replicas,
                        "stage_replicas": args.stage_replicas,
                        "recall_shards": args.recall_shards,
                        "pin_cpus": int(args.pin_cpus),
                    },
                )
            )
            address = cluster.gateway_address
            monitor = ServiceMonitor(cluster_pids(cluster))
            idle = monitor.sample()
            print(
                "  RSS after warm-up (MiB): "
                + ", ".join(f"{k} {v[1] / 2**20:.0f}" for k, v in idle.items()),
                flush=True,
            )
        else:
            address = args.address
            idle = {}
        result = run_load(address, users, words, cfg, monitor, log=lambda s: print(s, flush=True))
    write_csv(args.out / "load.csv", result.rows)
    write_requests(
        args.out / "load_requests.csv.gz", result.records, result.step_of, result.offered_of
    )
    title = (
        f"{manifest.get('num_items', '?'):,} items, {cfg.search_share:.0%} search, "
        f"{cfg.clients} client procs, {info['cpu']} ({info['cores']} cores), "
        f"load {info['loadavg'][0]}→{os.getloadavg()[0]:.1f}"
    )
    figs = plot_load(result.rows, args.out, title)
    copied = copy_figures(figs, args.figures, args.tag)
    summary = {
        "command": command_line(argv),
        "machine": info,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "artifacts": str(args.artifacts),
        "num_items": manifest.get("num_items"),
        "config": dict(cfg.__dict__),
        "env": env,
        "saturation": result.saturation,
        "idle_rss_mib": {k: round(v[1] / 2**20, 1) for k, v in idle.items()},
        "services": result.services,
        "figures": [str(p) for p in [*figs, *copied]],
        "client_ok_all_steps": all(bool(r["client_ok"]) for r in result.rows),
    }
    (args.out / "load.json").write_text(json.dumps(summary, indent=2, default=str))
    sat = result.saturation
    print(
        f"saturation (p99 within budget for >= {GOOD_FRACTION:.0%} good): "
        f"{sat['saturation_qps']:g} req/s; first failing step: {sat['first_failing_qps']}",
        flush=True,
    )
    if not summary["client_ok_all_steps"]:
        print("note: the client check failed on some steps (see client_ok in the CSV)", flush=True)
    print(
        f"wrote {args.out}/load.csv, load.json, load_requests.csv.gz, "
        + ", ".join(str(p) for p in [*figs, *copied]),
        flush=True,
    )
    return 0


def command_line(argv: Sequence[str] | None) -> str:
    """``sluice bench …`` as run (``argv``: the arguments after ``bench``)."""
    return "sluice bench " + " ".join(argv if argv is not None else sys.argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sluice bench load", description=__doc__.split("\n")[0])
    add_load_args(ap)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = ap.parse_args(argv)
    return load_main(args, ["load", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
