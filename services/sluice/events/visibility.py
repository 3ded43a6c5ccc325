"""Real-time visibility benchmark through the real gateway over gRPC.

``python -m sluice.events.visibility [--artifacts DIR] [--state embedded|redis]``
starts a cluster (Triton and the five services, as ``sluice up`` does) on
free ports and measures:

a. **ingest**: Track throughput and ack latency with batches of 100 from
   several client processes (fsync on, every ack durable), as the clients see it and as
   the gateway does (``sluice_track_ack_seconds``, receipt to answer, read from its
   metrics endpoint before and after);
b. **visibility**: the time from Track's acknowledgement to a Recommend that
   reflects the event (a shopper clicks the top "similar items" result; the
   answer reflects it once that item is excluded as already seen);
c. **kill -9**: the gateway is SIGKILLed repeatedly under Track load; every
   acknowledged event must still be known afterwards (sent again it is a
   DUPLICATE) and, with Redis, every user's history must equal exactly what
   was sent (none lost, none applied twice).

With ``--state redis`` and no ``--redis-url`` a private redis-server is started.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from sluice import paths
from sluice.artifacts import Artifacts
from sluice.events.metrics import histogram_quantile
from sluice.launch import Cluster, Ports
from sluice.state.store import RedisStateStore
from sluice.v1 import storefront_pb2, storefront_pb2_grpc

ACCEPTED = storefront_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = storefront_pb2.EVENT_STATUS_DUPLICATE
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _stub(address: str) -> tuple[grpc.Channel, storefront_pb2_grpc.StorefrontServiceStub]:
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return channel, storefront_pb2_grpc.StorefrontServiceStub(channel)


def _event(event_id: str, user_id: str, item_id: int) -> storefront_pb2.Event:
    return storefront_pb2.Event(
        event_id=event_id, user_id=user_id, item_id=item_id, type=storefront_pb2.EVENT_TYPE_CLICK
    )


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) of ``values``."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98]


# -- (a) ingest ------------------------------------------------------------------------


@dataclass
class IngestResult:
    clients: int
    batch: int
    seconds: float
    events: int
    rate: float | None  # offered events/s (open loop); None: closed loop
    calls: int
    overloaded: int
    p50_ms: float
    p99_ms: float
    server_p50_ms: float = math.nan
    """The gateway's receipt -> answer time (``sluice_track_ack_seconds``), interpolated
    inside its histogram's buckets."""
    server_p99_ms: float = math.nan

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def _ingest_client(
    address: str,
    run: str,
    client: int,
    items: list[int],
    batch: int,
    seconds: float,
    interval_s: float | None = None,
) -> tuple[int, int, list[float]]:
    """One client process: Track batches until ``seconds`` pass; (accepted, overloaded, lat).

    ``interval_s`` None: closed loop, each call as soon as the last one answered. Otherwise
    open loop: call ``k`` is due at ``start + k * interval_s`` and its latency counts from
    that due time, so a call that starts late because the previous one was slow carries its
    wait (no coordinated omission)."""
    channel, stub = _stub(address)
    grpc.channel_ready_future(channel).result(timeout=30)  # connected before the clock runs
    # this client's imports out of its own collector's passes, as a service's are
    # (sluice.core.heap): their pauses are the client's, not the gateway's
    gc.freeze()
    rng = np.random.default_rng(client)
    accepted = overloaded = n = calls = 0
    latencies: list[float] = []
    start = time.perf_counter()
    stop = start + seconds
    try:
        while (now := time.perf_counter()) < stop:
            due = now if interval_s is None else start + calls * interval_s
            if due >= stop:
                break
            calls += 1
            picks = rng.integers(len(items), size=batch)
            req = storefront_pb2.TrackRequest(
                events=[
                    _event(f"{run}-{client}-{n + k}", f"ingest-{client}-{(n + k) % 500}", items[i])
                    for k, i in enumerate(picks.tolist())
                ]
            )
            n += batch
            if due > time.perf_counter():
                time.sleep(due - time.perf_counter())  # pacing to the schedule
            while True:
                started = time.perf_counter() if interval_s is None else due
                try:
                    resp = stub.Track(req, timeout=10)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    overloaded += 1
                    time.sleep(0.005)
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                accepted += sum(1 for s in resp.statuses if s == ACCEPTED)
                break
    finally:
        channel.close()
    return accepted, overloaded, latencies


def measure_ingest(
    address: str,
    items: list[int],
    clients: int,
    batch: int,
    seconds: float,
    rate: float | None = None,
) -> IngestResult:
    """Track load from ``clients`` processes: closed loop, or open loop at ``rate`` events/s
    in all (each client calls every ``clients * batch / rate`` seconds)."""
    interval = None if rate is None else clients * batch / rate
    run = uuid.uuid4().hex[:8]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(clients, mp_context=ctx) as pool:
        # Start the processes (imports, channel) before the clock runs.
        list(pool.map(_noop, range(clients)))
        started = time.perf_counter()
        futures = [
            pool.submit(_ingest_client, address, run, c, items, batch, seconds, interval)
            for c in range(clients)
        ]
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - started
    latencies = [x for _, _, lat in results for x in lat]
    p50, p99 = _quantiles(latencies)
    return IngestResult(
        clients,
        batch,
        elapsed,
        sum(a for a, _, _ in results),
        rate,
        len(latencies),
        sum(o for _, o, _ in results),
        p50,
        p99,
    )


def track_ack_buckets(metrics_port: int) -> list[tuple[float, float]]:
    """The gateway's ``sluice_track_ack_seconds`` buckets: (upper bound, cumulative count)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "sluice_track_ack_seconds":
            return sorted(
                (float(s.labels["le"]), s.value)
                for s in family.samples
                if s.name.endswith("_bucket")
            )
    return []


def server_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> tuple[float, float]:
    """(p50, p99) in ms of what was observed between two reads of the histogram."""
    counts = dict(before)
    delta = [(bound, count - counts.get(bound, 0.0)) for bound, count in after]
    return histogram_quantile(delta, 0.5) * 1000, histogram_quantile(delta, 0.99) * 1000


def _noop(_: int) -> None:
    import grpc as _grpc  # noqa: F401  (warm the worker's imports)


# -- (b) ack -> visible ------------------------------------------------------------------


@dataclass
class VisibilityResult:
    trials: int
    first_recommend_reflects: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    recommend_p50_ms: float


def measure_visibility(address: str, anchors: list[int], trials: int) -> VisibilityResult:
    """Per trial: a new shopper clicks the top similar item of an anchor; time until a
    Recommend for that anchor no longer shows it (already seen)."""
    channel, stub = _stub(address)
    run = uuid.uuid4().hex[:8]
    visible_ms: list[float] = []
    recommend_ms: list[float] = []
    first = 0

    def similar(user: str, anchor: int) -> list[int]:
        req = storefront_pb2.RecommendRequest(
            user_id=user,
            surface=storefront_pb2.SURFACE_SIMILAR_ITEMS,
            context_item_id=anchor,
            page_size=10,
        )
        started = time.perf_counter()
        resp = stub.Recommend(req, timeout=10)
        recommend_ms.append((time.perf_counter() - started) * 1000)
        return list(resp.page.item_ids)

    try:
        for t in range(trials):
            anchor = anchors[t % len(anchors)]
            user = f"visibility-{run}-{t}"
            top = similar(user, anchor)[0]
            req = storefront_pb2.TrackRequest(events=[_event(f"{run}-{t}", user, top)])
            resp = stub.Track(req, timeout=10)
            acked = time.perf_counter()
            if list(resp.statuses) != [ACCEPTED]:
                raise RuntimeError(f"event not accepted: {resp}")
            deadline = acked + 10.0
            attempts = 0
            while True:
                attempts += 1
                if top not in similar(user, anchor):
                    visible_ms.append((time.perf_counter() - acked) * 1000)
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"trial {t}: the event never became visible")
            first += attempts == 1
    finally:
        channel.close()
    p50, p99 = _quantiles(visible_ms)
    return VisibilityResult(trials, first, p50, p99, max(visible_ms), _quantiles(recommend_ms)[0])


# -- (c) kill -9 under load -------------------------------------------------------------


@dataclass
class Load:
    """Track clients (threads) sending batches until stopped; a batch whose call failed
    is re-sent with the same ids until it is answered."""

    address: str
    items: list[int]
    clients: int = 3
    batch: int = 100
    users_per_client: int = 50
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    acked: list[storefront_pb2.Event] = field(default_factory=list)
    sent: dict[str, list[int]] = field(default_factory=dict)
    resent: int = 0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.threads = [
            threading.Thread(target=self._guarded, args=(c,), daemon=True)
            for c in range(self.clients)
        ]
        for thread in self.threads:
            thread.start()
        return self

    @property
    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def _guarded(self, c: int) -> None:
        try:
            self._run(c)
        except BaseException as exc:
            with self.lock:
                self.errors.append(exc)
            raise

    def _run(self, c: int) -> None:
        channel, stub = _stub(self.address)
        rng = np.random.default_rng(1000 + c)
        n = 0
        try:
            while not self.stop.is_set():
                events = []
                for pick in rng.integers(len(self.items), size=self.batch).tolist():
                    user = f"soak-{self.run}-{c}-{n % self.users_per_client}"
                    events.append(_event(f"{self.run}-{c}-{n}", user, self.items[pick]))
                    with self.lock:
                        self.sent.setdefault(user, []).append(self.items[pick])
                    n += 1
                req = storefront_pb2.TrackRequest(events=events)
                while True:
                    try:
                        resp = stub.Track(req, timeout=5)
                        break
                    except grpc.RpcError as err:
                        if err.code() not in _RETRY:
                            raise
                        with self.lock:
                            self.resent += 1
                        time.sleep(0.05)  # the gateway is down or warming up: back off
                if not set(resp.statuses) <= {ACCEPTED, DUPLICATE}:
                    raise RuntimeError(f"unexpected statuses {set(resp.statuses)}")
                with self.lock:
                    self.acked.extend(
                        e for e, s in zip(events, resp.statuses, strict=True) if s == ACCEPTED
                    )
        finally:
            channel.close()

    def wait_for(self, acked: int, timeout_s: float = 120.0) -> None:
        """Wait until ``acked`` events are acknowledged (progress, polled with a deadline)."""
        deadline = time.monotonic() + timeout_s
        while self.acked_count < acked:
            if self.errors:
                raise RuntimeError("a load client failed") from self.errors[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"load stalled at {self.acked_count} acknowledged events")
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        if self.errors:
            raise RuntimeError("a load client failed") from self.errors[0]


@dataclass
class KillResult:
    kills: int
    acked: int
    lost: int
    resent_calls: int
    restart_p50_s: float
    restart_max_s: float
    histories_checked: int
    histories_wrong: int


def measure_kills(
    cluster: Cluster, items: list[int], kills: int, redis_url: str | None
) -> KillResult:
    load = Load(cluster.gateway_address, items).start()
    restarts: list[float] = []
    try:
        for _ in range(kills):
            load.wait_for(load.acked_count + 500)  # some load between kills
            started = time.perf_counter()
            cluster.restart("gateway", kill=True)
            restarts.append(time.perf_counter() - started)
        load.wait_for(load.acked_count + 500)
    finally:
        load.finish()
    channel, stub = _stub(cluster.gateway_address)
    lost = 0
    try:
        for i in range(0, len(load.acked), 1000):
            chunk = load.acked[i : i + 1000]
            resp = stub.Track(storefront_pb2.TrackRequest(events=chunk), timeout=30)
            lost += sum(1 for s in resp.statuses if s != DUPLICATE)
    finally:
        channel.close()
    wrong = checked = 0
    if redis_url:
        store = RedisStateStore.from_url(redis_url)
        try:
            for user, sent in load.sent.items():
                checked += 1
                wrong += store.history(user) != sent[-store.config.history_cap :]
        finally:
            store.close()
    return KillResult(
        kills,
        len(load.acked),
        lost,
        load.resent,
        statistics.median(restarts) if restarts else 0.0,
        max(restarts, default=0.0),
        checked,
        wrong,
    )


# -- main --------------------------------------------------------------------------------


@contextmanager
def _redis(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from sluice.events.bench import redis_server

    with redis_server() as started:
        yield started


@dataclass
class Report:
    state: str
    artifacts: str
    items: int
    startup_s: float
    ingest: IngestResult
    visibility: VisibilityResult
    kills: KillResult


def run(args: argparse.Namespace) -> Report:
    artifacts = Artifacts(Path(args.artifacts))
    catalog = artifacts.catalog
    in_stock = catalog.item_ids[np.flatnonzero(catalog.in_stock)].tolist()
    rng = np.random.default_rng(0)
    anchors = [int(a) for a in rng.choice(in_stock, size=min(50, len(in_stock)), replace=False)]
    redis_ctx = _redis(args.redis_url) if args.state == "redis" else nullcontext("")
    with tempfile.TemporaryDirectory(prefix="sluice-visibility-") as tmp, redis_ctx as url:
        if url:
            import redis

            with redis.Redis.from_url(url) as r:
                r.flushdb()
        cluster = Cluster(
            artifacts=artifacts.root,
            ports=Ports.random(),
            log_dir=Path(tmp) / "logs",
            event_log_dir=Path(tmp) / "events",
            state=args.state,
            redis_url=url,
        )
        started = time.perf_counter()
        cluster.start(timeout_s=300)
        startup_s = time.perf_counter() - started
        try:
            _say(f"cluster up in {startup_s:.0f} s ({args.state}); ingesting …")
            metrics_port = cluster.metrics_port_of("gateway")
            if args.warmup > 0:  # the same load, not counted: first calls open the log
                measure_ingest(
                    cluster.gateway_address,
                    in_stock,
                    args.clients,
                    args.batch,
                    args.warmup,
                    args.rate,
                )
            before = track_ack_buckets(metrics_port)
            ingest = measure_ingest(
                cluster.gateway_address,
                in_stock,
                args.clients,
                args.batch,
                args.seconds,
                args.rate,
            )
            server_p50, server_p99 = server_quantiles(before, track_ack_buckets(metrics_port))
            ingest = replace(ingest, server_p50_ms=server_p50, server_p99_ms=server_p99)
            _say(f"{ingest.events_per_s:.0f} events/s; measuring ack -> visible …")
            visibility = measure_visibility(cluster.gateway_address, anchors, args.trials)
            _say(f"p50 {visibility.p50_ms:.1f} ms; {args.kills} kill -9 restarts under load …")
            kills = measure_kills(cluster, in_stock, args.kills, url or None)
        finally:
            cluster.stop()
    return Report(
        args.state, str(artifacts.root), len(catalog), startup_s, ingest, visibility, kills
    )


def _say(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def render(r: Report) -> str:
    i, v, k = r.ingest, r.visibility, r.kills
    rows = [
        ("store", r.state),
        ("catalog items", f"{r.items}"),
        (
            f"ingest (batches of {i.batch}, {i.clients} client processes, {i.seconds:.0f} s, "
            + ("closed loop)" if i.rate is None else f"offered {i.rate:,.0f} events/s)"),
            f"{i.events_per_s:,.0f} events/s",
        ),
        ("Track ack latency p50 / p99 (clients)", f"{i.p50_ms:.1f} / {i.p99_ms:.1f} ms"),
        (
            "Track receipt -> answer p50 / p99 (gateway)",
            f"{i.server_p50_ms:.1f} / {i.server_p99_ms:.1f} ms",
        ),
        ("Track calls overloaded (RESOURCE_EXHAUSTED)", f"{i.overloaded} of {i.calls}"),
        ("ack -> visible in Recommend p50 / p99", f"{v.p50_ms:.1f} / {v.p99_ms:.1f} ms"),
        ("first Recommend after the ack reflects it", f"{v.first_recommend_reflects}/{v.trials}"),
        ("Recommend latency p50 (similar items)", f"{v.recommend_p50_ms:.1f} ms"),
        ("kill -9 restarts of the gateway under load", f"{k.kills}"),
        ("acknowledged events / lost", f"{k.acked:,} / {k.lost}"),
        ("calls re-sent after a failed call", f"{k.resent_calls}"),
        (
            "gateway restart to healthy p50 / max",
            f"{k.restart_p50_s:.1f} / {k.restart_max_s:.1f} s",
        ),
    ]
    if k.histories_checked:
        rows.append(
            (
                "user histories exactly as sent (Redis)",
                f"{k.histories_checked - k.histories_wrong}/{k.histories_checked}",
            )
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.events.visibility")
    parser.add_argument("--artifacts", default=str(paths.default_artifacts()))
    parser.add_argument("--state", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--redis-url", help="an existing Redis (flushed!); default: start one")
    parser.add_argument("--clients", type=int, default=4, help="ingest client processes")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="ingest duration")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of the same ingest load before the measured one (not counted)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="offered events/s, open loop (latency from each call's due time); "
        "default: closed loop, as fast as the gateway answers",
    )
    parser.add_argument("--trials", type=int, default=200, help="ack -> visible trials")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not (Path(args.artifacts) / "manifest.json").exists():
        parser.error(f"no build in {args.artifacts}: run `sluice build` (see --help)")
    report = run(args)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    ok = report.kills.lost == 0 and report.kills.histories_wrong == 0
    print("PASS: no acknowledged event lost" if ok else "FAIL: acknowledged events lost")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
