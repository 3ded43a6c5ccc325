"""Ingest benchmark and kill -9 soak.

``python -m sluice.events.bench`` measures ingest throughput and ack latency
(fsync on) against the in-memory store and a Redis store (a private
redis-server is started), then kills an ingesting subprocess with SIGKILL
repeatedly and checks that no acknowledged event is lost or applied twice.

``python -m sluice.events.bench worker --log-dir D [--redis-url U]`` is that
subprocess: it ingests until killed and prints each acknowledged event id.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

import sluice
from sluice.core.errors import ResourceExhausted
from sluice.events.ingest import Ingestor
from sluice.events.log import EventLog, encode_record
from sluice.events.model import Event, EventStatus, EventType, now_ms
from sluice.state.store import InMemoryStateStore, OnlineStateStore, RedisStateStore

N_ITEMS = 5000
N_USERS = 2000
_TYPES = (
    (EventType.VIEW,) * 6 + (EventType.CLICK,) * 3 + (EventType.ADD_TO_CART, EventType.PURCHASE)
)


def item_attributes(item_id: int) -> tuple[str, str]:
    """Synthetic catalog: 40 categories, 150 brands."""
    return f"cat{item_id % 40}", f"brand{item_id % 150}"


def make_batch(prefix: str, start: int, size: int, rng: random.Random) -> list[Event]:
    """``size`` fresh events with ids ``{prefix}-{n}``; user ``n % N_USERS``."""
    ts = now_ms()
    return [
        Event(
            f"{prefix}-{n}",
            f"u{n % N_USERS}",
            rng.randint(1, N_ITEMS),
            rng.choice(_TYPES),
            ts,
        )
        for n in range(start, start + size)
    ]


def open_store(redis_url: str | None) -> OnlineStateStore:
    if redis_url:
        return RedisStateStore.from_url(redis_url, item_attributes)
    return InMemoryStateStore(item_attributes)


# -- redis-server --------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    """Run a throwaway redis-server on a free loopback port; yield its URL."""
    directory = tempfile.mkdtemp(prefix="sluice-bench-redis-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            directory,
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            "",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError("redis-server failed to start")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


# -- throughput ----------------------------------------------------------------


@dataclass
class Throughput:
    store: str
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    commits: int
    overloaded: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def measure_throughput(
    store_name: str,
    store: OnlineStateStore,
    *,
    seconds: float = 6.0,
    clients: int = 4,
    batch: int = 100,
) -> Throughput:
    """Ingest from ``clients`` threads in batches for ``seconds``; fsync on."""
    with tempfile.TemporaryDirectory(prefix="sluice-bench-log-") as d, EventLog(d) as log:
        ingestor = Ingestor(log, store)
        latencies: list[list[float]] = [[] for _ in range(clients)]
        overloaded = [0]

        # Events are built up front so the clients spend their time in track().
        per_client = int(seconds * 60_000 / clients / batch) + 1
        prefix = uuid.uuid4().hex[:8]
        rngs = [random.Random(c) for c in range(clients)]
        work = [
            [make_batch(f"{prefix}-{c}", b * batch, batch, rngs[c]) for b in range(per_client)]
            for c in range(clients)
        ]

        def client(idx: int) -> None:
            for events in work[idx]:
                if time.monotonic() >= stop:
                    return
                started = time.perf_counter()
                try:
                    ingestor.track(events)
                except ResourceExhausted:
                    overloaded[0] += 1
                    continue
                latencies[idx].append(time.perf_counter() - started)

        stop = time.monotonic() + seconds
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        lat = sorted(x * 1000.0 for per in latencies for x in per)
        q = statistics.quantiles(lat, n=100)
        return Throughput(
            store_name,
            ingestor.events_accepted,
            elapsed,
            q[49],
            q[98],
            lat[-1],
            log.commits,
            overloaded[0],
        )


# -- kill -9 soak --------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> None:
    """Ingest until killed; print each acknowledged event id on its own line."""
    store = open_store(args.redis_url)
    with EventLog(args.log_dir) as log:
        ingestor = Ingestor(log, store)
        ingestor.recover()
        out_lock = threading.Lock()
        run = uuid.uuid4().hex[:10]

        def client(idx: int) -> None:
            rng = random.Random()
            n = 0
            while True:
                events = make_batch(f"{run}-{idx}", n, args.batch, rng)
                n += args.batch
                results = ingestor.track(events)
                acked = [
                    e.event_id
                    for e, r in zip(events, results, strict=True)
                    if r.status == EventStatus.ACCEPTED
                ]
                with out_lock:
                    sys.stdout.write("".join(f"{eid}\n" for eid in acked))
                    sys.stdout.flush()

        threads = [
            threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.threads)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def worker_command(
    log_dir: Path, redis_url: str | None, threads: int = 3, batch: int = 50
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sluice.events.bench",
        "worker",
        "--log-dir",
        str(log_dir),
        "--threads",
        str(threads),
        "--batch",
        str(batch),
    ]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    return cmd


def ingest_then_kill(
    cmd: Sequence[str], kill_after: int, env: dict[str, str] | None = None
) -> set[str]:
    """Start the worker, SIGKILL it after ``kill_after`` acks; return every id it acked."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env or worker_env())
        assert proc.stdout is not None
        acked: set[str] = set()
        for line in proc.stdout:
            if line.endswith(b"\n"):
                acked.add(line[:-1].decode())
            if len(acked) >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        # Lines already in the pipe were acknowledged before the kill; a line cut
        # by the kill has no newline and was never acknowledged.
        for line in proc.stdout:
            if line.endswith(b"\n"):
                acked.add(line[:-1].decode())
        proc.stdout.close()
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            errors.seek(0)
            raise RuntimeError(
                f"worker exited with {proc.returncode} before the kill:\n{errors.read().decode()}"
            )
    return acked


def tear_tail(log_dir: Path, rng: random.Random) -> None:
    """Append a partly written record to the last segment, as a power loss might leave."""
    record = encode_record(Event("torn", "torn", 1, EventType.VIEW, now_ms()), now_ms())
    last = max(log_dir.glob("*.log"), key=lambda p: int(p.stem))
    with last.open("ab") as f:
        f.write(record[: rng.randint(1, len(record) - 1)])


@dataclass
class SoakResult:
    store: str
    kills: int
    acked: int
    lost: int
    logged: int
    applied: int
    recover_s: float


def history_total(store: OnlineStateStore) -> int:
    """Sum of history lengths over the synthetic users (each far below the cap)."""
    if isinstance(store, RedisStateStore):
        pipe = store.client.pipeline(transaction=False)
        for u in range(N_USERS):
            pipe.llen(store.user_key(f"u{u}", "seq"))
        return sum(pipe.execute())
    return sum(len(store.history(f"u{u}")) for u in range(N_USERS))


def verify(log_dir: Path, redis_url: str | None, acked: set[str]) -> tuple[int, int, int, float]:
    """Recover like a restarted service; return (lost, distinct logged, applied, recover s)."""
    store = open_store(redis_url)
    try:
        with EventLog(log_dir) as log:
            started = time.perf_counter()
            Ingestor(log, store).recover()
            recover_s = time.perf_counter() - started
            logged = {e.event_id for e in log.replay()}
        ids = sorted(acked)
        seen = store.seen_many(ids)
        lost = sum(1 for s in seen if not s)
        return lost, len(logged), history_total(store), recover_s
    finally:
        store.close()


def soak(store_name: str, redis_url: str | None, *, kills: int = 10, seed: int = 7) -> SoakResult:
    """Kill the worker ``kills`` times under load, then check every ack survived."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as d:
        log_dir = Path(d)
        acked: set[str] = set()
        cmd = worker_command(log_dir, redis_url)
        for _ in range(kills):
            acked |= ingest_then_kill(cmd, rng.randint(500, 4000))
            tear_tail(log_dir, rng)
        lost, logged, applied, recover_s = verify(log_dir, redis_url, acked)
    return SoakResult(store_name, kills, len(acked), lost, logged, applied, recover_s)


def worker_env() -> dict[str, str]:
    """This environment with the ``sluice`` package importable."""
    services = str(Path(sluice.__file__).resolve().parent.parent)  # wherever it is installed
    existing = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{services}{os.pathsep}{existing}" if existing else services,
    }


# -- main ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluice.events.bench")
    sub = parser.add_subparsers(dest="cmd")
    worker = sub.add_parser("worker", help="ingest until killed, printing acked ids")
    worker.add_argument("--log-dir", required=True)
    worker.add_argument("--redis-url")
    worker.add_argument("--threads", type=int, default=3)
    worker.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", default="1,2,4", help="client thread counts, comma-separated")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "worker":
        run_worker(args)
        return 0

    out = sys.stdout.write
    client_counts = [int(c) for c in str(args.clients).split(",")]
    with redis_server() as url:
        out(f"\ningest, fsync on, batches of {args.batch}, {args.seconds:.0f} s per row\n")
        out(
            f"{'store':<8}{'clients':>8}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'max ms':>9}{'ev/fsync':>10}{'overload':>10}\n"
        )
        for name in ("memory", "redis"):
            for clients in client_counts:
                store = open_store(url if name == "redis" else None)
                r = measure_throughput(
                    name, store, seconds=args.seconds, clients=clients, batch=args.batch
                )
                store.close()
                out(
                    f"{r.store:<8}{clients:>8}{r.events_per_s:>10.0f}{r.p50_ms:>9.2f}"
                    f"{r.p99_ms:>9.2f}{r.max_ms:>9.2f}{r.events / max(r.commits, 1):>10.1f}"
                    f"{r.overloaded:>10}\n"
                )
                sys.stdout.flush()
        redis.Redis.from_url(url).flushall()
        soaks = [soak("memory", None, kills=args.kills), soak("redis", url, kills=args.kills)]
    out(f"\nkill -9 soak: {args.kills} kills per store under load\n")
    out(f"{'store':<8}{'acked':>8}{'lost':>6}{'logged':>8}{'applied':>9}{'recover s':>11}\n")
    ok = True
    for s in soaks:
        out(f"{s.store:<8}{s.acked:>8}{s.lost:>6}{s.logged:>8}{s.applied:>9}{s.recover_s:>11.2f}\n")
        ok &= s.lost == 0 and s.applied == s.logged
    out("PASS: no acknowledged event lost, none applied twice\n" if ok else "FAIL\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
