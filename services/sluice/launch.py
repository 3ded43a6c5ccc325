"""Start Triton and every service as separate processes, wait on their health.

Used by ``sluice up`` / ``sluice demo`` and by the integration tests, so the
tests exercise exactly what an operator runs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.artifacts import Artifacts
from sluice.balancer import Backend, haproxy_config
from sluice.builds import resolve
from sluice.fine.contract import model_config_name
from sluice.tools.triton_setup import backend_dir, install_stub, triton_env, tritonserver_binary

STAGES = ("recall", "coarse", "fine", "rerank")
STOREFRONT_SERVICE = "sluice.v1.StorefrontService"
"""What HAProxy's health check asks the gateways about (SERVING once warm)."""

# Six processes share the machine's cores and each serves one request per thread: OpenMP
# threads that spin while waiting for work, and BLAS thread pools, only steal CPU from the
# process that has work. Set unless the caller's environment says otherwise.
CPU_SHARING_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; else 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free now, below the ephemeral range.

    A port the kernel picks for ``bind(0)`` lies in the ephemeral range, where any outgoing
    connection (a gRPC client, Redis) may take it in the seconds before the service that
    was given it binds: a flaky "address already in use". Ports below that range are only
    ever taken by an explicit bind.
    """
    low, high = 10_000, _ephemeral_low()
    if high - low < 1000:
        low, high = 1024, 65535
    rng = random.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(low, high)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class Ports:
    gateway: int = 50051
    recall: int = 50061
    coarse: int = 50062
    fine: int = 50063
    rerank: int = 50064
    triton_http: int = 8000
    triton_grpc: int = 8001
    triton_metrics: int = 8002
    metrics: dict[str, int] = field(
        default_factory=lambda: {
            "gateway": 9151,
            "recall": 9161,
            "coarse": 9162,
            "fine": 9163,
            "rerank": 9164,
        }
    )
    replicas: dict[str, int] = field(default_factory=dict)
    """gRPC ports of the processes of a service started several times (``gateway-1``,
    ``recall-2``, ...) and of the redis-server they share (``redis``), by process name; their
    metrics ports are in ``metrics`` under the same names (HAProxy's under ``lb``). What is
    missing is chosen when the cluster starts."""

    @classmethod
    def random(cls) -> Ports:
        names = ("gateway", *STAGES)
        ports = free_ports(8 + len(names))  # distinct: no two servers share one
        return cls(
            gateway=ports[0],
            recall=ports[1],
            coarse=ports[2],
            fine=ports[3],
            rerank=ports[4],
            triton_http=ports[5],
            triton_grpc=ports[6],
            triton_metrics=ports[7],
            metrics=dict(zip(names, ports[8:], strict=True)),
        )


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True)
class ClusterTls:
    """Certificates (PEM files) for a cluster on TLS everywhere.

    ``server`` is every service's (and Triton's) certificate, for the addresses they listen
    on; ``gateway_client`` is the gateway's identity towards the stages (they accept only it)
    and ``fine_client`` the fine stage's towards Triton. All are signed by ``ca``."""

    ca: Path
    server_cert: Path
    server_key: Path
    gateway_client_cert: Path
    gateway_client_key: Path
    fine_client_cert: Path
    fine_client_key: Path
    gateway_identity: str = "sluice-gateway"

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """What the launcher (health checks) and tests use to reach any service."""
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            self.gateway_client_key.read_bytes(),
            self.gateway_client_cert.read_bytes(),
        )


@dataclass
class Cluster:
    """A running Sluice deployment on this machine."""

    artifacts: Path
    ports: Ports = field(default_factory=Ports)
    log_dir: Path = Path("var/logs")
    event_log_dir: Path = Path("var/events")
    fine_backend: str = "triton"
    state: str = "embedded"
    redis_url: str = ""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    triton_gpu: bool = False
    stages: str = "grpc"
    """"local": only Triton and the gateway, which runs the stages in its process."""
    supervise: bool = False
    """Restart a process that exits without being asked to, with back-off (``sluice up``)."""
    tls: ClusterTls | None = None
    """TLS on every port, mTLS from the gateway to the stages and from fine to Triton."""
    api_keys: tuple[str, ...] = ()
    """Storefront API keys: with any, Search, Recommend and Track need one."""
    replicas: int = 1
    """Gateway processes. More than one: they run behind HAProxy, which listens on
    ``ports.gateway`` (the storefront address), and share their state, Track's event log
    (Redis Streams) and their page-token key; without a ``redis_url`` the cluster starts a
    redis-server (AOF, ``appendfsync always``) for them. See :mod:`sluice.balancer`."""
    stage_replicas: int = 0
    """Processes of each stage service (0: 2 with several gateways, else 1). The gateways reach
    several with round_robin, health checks and retries over ``ipv4:a,b``."""
    recall_shards: int = 0
    """Recall shards (0: recall holds the whole catalog). With N, processes ``shard-0`` ...
    ``shard-<N-1>`` each serve one shard of the build's sharded catalog (``sluice shard``),
    and every recall process is a front over them (:mod:`sluice.recall.shards`)."""
    catalog_keys: tuple[str, ...] = ()
    """Keys for CatalogService/UpdateItems. With any, every service follows the live catalog
    update log ``catalog_updates`` (:mod:`sluice.data.updates`)."""
    catalog_updates: str = ""
    """The update log: a file path or a Redis URL (default: ``updates.jsonl`` beside the
    event logs, or a stream in the cluster's Redis when the gateways share one)."""
    pin_cpus: bool = False
    """One machine only (``stages="local"``): each gateway process runs on a core of its own,
    and every other process (Triton with its python-backend stubs, Redis, HAProxy) on the
    cores left, or on all of them when none is left (:meth:`cpu_plan`). A gateway's Python
    holds one GIL, so it runs on one core at a time anyway; pinned, its threads hand the GIL
    over on that core, its caches stay warm, and Triton is not preempted by it
    (``docs/benchmarks.md``, "One core for the gateway")."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    """How often the supervisor restarted each process."""
    _launch: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _page_token_key: str = ""
    _stopping: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(
        default_factory=lambda: threading.Condition(threading.RLock())
    )

    # -- lifecycle ---------------------------------------------------------------
    def start(self, timeout_s: float = 180.0, progress: bool = False) -> Cluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.catalog_keys and self.recall_shards:
            raise ValueError("live catalog updates need an unsharded recall (no recall_shards)")
        if self.pin_cpus and self.stages != "local":
            raise ValueError("pin_cpus plans the one-machine layout (stages='local') only")
        if self.pin_cpus and shutil.which("taskset") is None:
            raise ValueError("pin_cpus needs taskset (util-linux)")
        deadline = time.monotonic() + timeout_s
        try:
            self._plan_replicas()
            if "redis" in self.ports.replicas:  # the gateways' own (no redis_url given)
                self._start_redis()
                self._wait_ready("redis", deadline)
                self.redis_url = f"redis://127.0.0.1:{self.ports.replicas['redis']}/0"
                if progress:
                    print(
                        f"  redis     127.0.0.1:{self.ports.replicas['redis']}  ready", flush=True
                    )
            stage_processes = [n for s in self._stage_services() for n in self.process_names(s)]
            stage_processes = [*self.shard_names(), *stage_processes]  # a front waits for them
            if self.fine_backend == "triton":
                self._start_triton()
            for name in stage_processes:
                self._start_service(name)
            if self.fine_backend == "triton":
                self._wait_triton(deadline)
                if progress:
                    print(f"  triton    grpc 127.0.0.1:{self.ports.triton_grpc}  ready", flush=True)
            gateways = self.process_names("gateway")
            for name in stage_processes:
                self._wait_health(name, self.port_of(name), deadline)
                if progress:
                    print(f"  {name:<9} grpc 127.0.0.1:{self.port_of(name)}  serving", flush=True)
            for name in gateways:
                self._start_service(name)
            for name in gateways:
                self._wait_health(name, self.port_of(name), deadline)
                if progress:
                    print(f"  {name:<9} grpc 127.0.0.1:{self.port_of(name)}  serving", flush=True)
            if self.replicas > 1:
                self._start_lb()
                self._wait_ready("lb", deadline)
                if progress:
                    print(
                        f"  haproxy   grpc {self.gateway_address}  in front of "
                        f"{', '.join(gateways)}; stats http://127.0.0.1:"
                        f"{self.ports.metrics['lb']}/stats",
                        flush=True,
                    )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process group (gateway first), SIGKILL what is left after ``grace_s``.

        Each process leads its own process group, so what it started (Triton's python-backend
        stubs) goes with it."""
        with self._changed:  # from here on the supervisor starts nothing
            self._stopping.set()
        stages = [n for s in STAGES for n in self.process_names(s)]
        order = ["lb", *self.process_names("gateway"), *stages, *self.shard_names()]
        order += ["triton", "redis"]
        for name in [*order, *(n for n in self.processes if n not in order)]:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        end = time.monotonic() + grace_s
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # anything the process left behind
        self.processes.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    def address(self, service: str) -> str:
        """Where a service (gateway, recall, coarse, fine, rerank) or one process (``lb``,
        ``gateway-2``, ``recall-1``) listens. A stage with several replicas: the gRPC target
        naming them all (``ipv4:127.0.0.1:a,127.0.0.1:b``); the gateway with several: the
        load balancer."""
        if service in STAGES and self.replica_count(service) > 1:
            names = self.process_names(service)
            return "ipv4:" + ",".join(f"127.0.0.1:{self.port_of(n)}" for n in names)
        return f"127.0.0.1:{self.port_of(service)}"

    # -- replicas ----------------------------------------------------------------
    def replica_count(self, service: str) -> int:
        """How many processes of ``service`` (gateway or a stage) this cluster runs."""
        if service == "gateway":
            return max(1, self.replicas)
        if self.stages != "grpc":  # the gateways run the stages in their own processes
            return 1
        if self.stage_replicas:
            return self.stage_replicas
        return 2 if self.replicas > 1 else 1

    def shard_names(self) -> list[str]:
        """The recall shards' processes, in shard order."""
        if self.stages != "grpc":
            return []
        return [f"shard-{i}" for i in range(self.recall_shards)]

    def process_names(self, service: str) -> list[str]:
        """The processes of a service: its name alone, or ``<service>-1`` ... ``-N``."""
        count = self.replica_count(service)
        return [service] if count == 1 else [f"{service}-{i}" for i in range(1, count + 1)]

    def port_of(self, name: str) -> int:
        """The port of one process (``gateway``, ``recall-2``, ``lb``, ``redis``, ...)."""
        if name in ("lb", "gateway"):
            return self.ports.gateway
        if name in self.ports.replicas:
            return self.ports.replicas[name]
        return int(getattr(self.ports, name))

    def metrics_port_of(self, name: str) -> int:
        """Where one process serves Prometheus metrics (``lb``: HAProxy's, with ``/stats``)."""
        return self.ports.metrics[name]

    def _stage_services(self) -> tuple[str, ...]:
        return STAGES if self.stages == "grpc" else ()

    def _plan_replicas(self) -> None:
        """Choose the ports the replicas lack; several gateways share Redis."""
        if self.replicas > 1:
            self.state = "redis"  # what one gateway acknowledged, every other one sees
        names = [
            n
            for s in ("gateway", *self._stage_services())
            if self.replica_count(s) > 1
            for n in self.process_names(s)
        ] + self.shard_names()
        grpc_ports = [n for n in names if n not in self.ports.replicas]
        if self.replicas > 1 and not self.redis_url and "redis" not in self.ports.replicas:
            grpc_ports.append("redis")
        lb = ["lb"] if self.replicas > 1 else []
        metrics = [n for n in [*names, *lb] if n not in self.ports.metrics]
        p = self.ports
        taken = {p.gateway, *(getattr(p, s) for s in STAGES), p.triton_http, p.triton_grpc}
        taken |= {p.triton_metrics, *p.replicas.values(), *p.metrics.values()}
        fresh = free_ports(len(grpc_ports) + len(metrics) + len(taken))
        fresh = [port for port in fresh if port not in taken]
        for name in grpc_ports:
            self.ports.replicas[name] = fresh.pop()
        for name in metrics:
            self.ports.metrics[name] = fresh.pop()
        if self.replicas > 1 and not self._page_token_key:
            self._page_token_key = secrets.token_hex(32)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def cpu_plan(self) -> dict[str, list[int]]:
        """The cores each process may run on under :attr:`pin_cpus` (gateway processes by
        name, everything else under ``"*"``); empty when nothing is pinned: pinning is off,
        or this process may use one core only."""
        cores = sorted(os.sched_getaffinity(0))
        if not self.pin_cpus or len(cores) < 2:
            return {}
        gateways = self.process_names("gateway")
        plan = {name: [cores[i % len(cores)]] for i, name in enumerate(gateways)}
        plan["*"] = cores[len(gateways) :] or cores
        return plan

    def _pinned(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run on the process's cores (``taskset``: every thread and child the
        process starts inherits them, Triton's stubs too)."""
        plan = self.cpu_plan()
        if not plan:
            return argv
        cores = plan.get(name, plan["*"])
        return [
            shutil.which("taskset") or "taskset",
            "--cpu-list",
            ",".join(map(str, cores)),
            *argv,
        ]

    # -- processes ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                self._pinned(name, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        with self._changed:  # re-entrant: the supervisor spawns while holding it
            self.processes[name] = proc
            self._launch[name] = (argv, env)
            self._changed.notify_all()
        if self.supervise:
            threading.Thread(
                target=self._watch, args=(name, proc), name=f"supervise-{name}", daemon=True
            ).start()

    def _watch(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Wait for the process to exit; clean up its group; restart it unless stopping."""
        started = time.monotonic()
        proc.wait()
        _signal_group(proc, signal.SIGKILL)  # orphans, such as Triton's python-backend stubs
        if self._stopping.is_set() or self.processes.get(name) is not proc:
            return
        lived = time.monotonic() - started
        count = self.restarts.get(name, 0)
        # back-off: 0.1 s, doubling to 5 s while the process keeps dying young
        delay = 0.1 if lived > 30 else min(5.0, 0.1 * 2 ** min(count, 6))
        print(
            f"supervisor: {name} exited with {proc.returncode} after {lived:.1f} s; "
            f"restarting in {delay:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if self._stopping.wait(delay):
            return
        with self._changed:
            if self._stopping.is_set() or self.processes.get(name) is not proc:
                return  # stopping, or someone else (restart()) started it again meanwhile
            self.restarts[name] = count + 1
            argv, env = self._launch[name]
            self._spawn(name, argv, env)

    def wait_restarted(self, name: str, times: int, timeout_s: float = 60.0) -> None:
        """Block until the supervisor has restarted ``name`` at least ``times`` times."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.restarts.get(name, 0) >= times, timeout_s):
                raise StartupError(f"{name} was not restarted within {timeout_s:.0f} s")

    def _start_triton(self) -> None:
        install_stub()
        repo = Artifacts(resolve(self.artifacts)).model_repository
        argv = [
            str(tritonserver_binary()),
            f"--model-repository={repo}",
            f"--backend-directory={backend_dir()}",
            f"--grpc-port={self.ports.triton_grpc}",
            f"--http-port={self.ports.triton_http}",
            f"--metrics-port={self.ports.triton_metrics}",
            # loopback only, like the services (SLUICE_*_HOST); Triton's default is 0.0.0.0
            "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            "--allow-metrics=true",
            "--log-verbose=0",
            "--exit-timeout-secs=10",
            # a build published later exports a new model version into the repository:
            # Triton loads it beside the serving one (version_policy keeps two) without restart
            "--model-control-mode=poll",
            "--repository-poll-secs=1",
        ]
        # gpu: configs/gpu.pbtxt; configs/local.pbtxt (python backend running model.onnx)
        # where this tritonserver has no onnxruntime backend; else the stock config.pbtxt
        config_name = model_config_name(backend_dir(), gpu=self.triton_gpu)
        if config_name:
            argv.append(f"--model-config-name={config_name}")
        if self.tls is not None:
            t = self.tls
            argv += [
                "--grpc-use-ssl=true",
                "--grpc-use-ssl-mutual=true",
                f"--grpc-server-cert={t.server_cert}",
                f"--grpc-server-key={t.server_key}",
                f"--grpc-root-cert={t.ca}",
            ]
        env = triton_env({**CPU_SHARING_ENV, **os.environ, **self.extra_env})
        self._spawn("triton", argv, env)

    def _service_env(self, process: str) -> dict[str, str]:
        env = {**CPU_SHARING_ENV, **os.environ}
        env.update(self.extra_env)
        p = self.ports
        name = _service_of(process)
        prefix = f"SLUICE_{name.upper()}_"
        if process in self.shard_names():
            env[prefix + "SHARD"] = process.split("-")[1]
        env[prefix + "ARTIFACTS"] = str(self.artifacts.resolve())
        env[prefix + "PORT"] = str(self.port_of(process))
        env[prefix + "METRICS_PORT"] = str(p.metrics[process])
        if name == "fine" or (name == "gateway" and self.stages == "local"):
            env["SLUICE_FINE_BACKEND"] = self.fine_backend
            env["SLUICE_FINE_TRITON_URL"] = f"127.0.0.1:{p.triton_grpc}"
        if name == "gateway":
            env[prefix + "STAGES"] = self.stages
            for stage in STAGES:  # several replicas: an ipv4: target naming them all
                env[prefix + f"{stage.upper()}_ADDR"] = self.address(stage)
            logs = self.event_log_dir if self.replicas == 1 else self.event_log_dir / process
            env[prefix + "EVENT_LOG_DIR"] = str(logs.resolve())
            env[prefix + "STATE"] = self.state
            if self.redis_url:
                env[prefix + "REDIS_URL"] = self.redis_url
            if self.replicas > 1:  # unless the caller chose otherwise
                env.setdefault(prefix + "EVENT_LOG", "redis")  # shared by every replica
                keys = json.dumps([self._page_token_key])  # a page from one, the next from another
                env.setdefault(prefix + "PAGE_TOKEN_KEYS", keys)
        if name == "recall":
            if process not in self.shard_names() and self.shard_names():
                addrs = [f"127.0.0.1:{self.port_of(n)}" for n in self.shard_names()]
                env[prefix + "SHARD_ADDRS"] = ";".join(addrs)
            # with a shared (redis) store, recall blends live popularity into its popularity
            env[prefix + "STATE"] = self.state
            if self.state == "redis" and self.redis_url:
                env[prefix + "REDIS_URL"] = self.redis_url
        if name == "gateway" and self.api_keys:
            env[prefix + "API_KEYS"] = json.dumps(list(self.api_keys))
        if self.catalog_keys:
            updates = self.catalog_updates or (
                self.redis_url  # several gateways share a Redis (the cluster's own, or given)
                if self.redis_url and self.replicas > 1
                else str((self.event_log_dir / "catalog-updates.jsonl").resolve())
            )
            for service in ("gateway", *STAGES):  # a local gateway loads the stages too
                env[f"SLUICE_{service.upper()}_CATALOG_UPDATES"] = updates
            if name == "gateway":
                env[prefix + "CATALOG_API_KEYS"] = json.dumps(list(self.catalog_keys))
        if self.tls is not None:
            t = self.tls
            env[prefix + "TLS_CERT_FILE"] = str(t.server_cert)
            env[prefix + "TLS_KEY_FILE"] = str(t.server_key)
            if name == "gateway":
                env[prefix + "STAGE_TLS_CA_FILE"] = str(t.ca)
                env[prefix + "STAGE_TLS_CERT_FILE"] = str(t.gateway_client_cert)
                env[prefix + "STAGE_TLS_KEY_FILE"] = str(t.gateway_client_key)
            else:  # a stage (a recall shard too) serves only the gateway's identity
                env[prefix + "TLS_CLIENT_CA_FILE"] = str(t.ca)
                env[prefix + "ALLOWED_PEERS"] = json.dumps([t.gateway_identity])
            if name == "recall" and process not in self.shard_names() and self.shard_names():
                env[prefix + "SHARD_TLS_CA_FILE"] = str(t.ca)  # a front calls its shards as
                env[prefix + "SHARD_TLS_CERT_FILE"] = str(t.gateway_client_cert)  # the gateway
                env[prefix + "SHARD_TLS_KEY_FILE"] = str(t.gateway_client_key)  # calls stages
            if name == "fine" or (name == "gateway" and self.stages == "local"):
                env["SLUICE_FINE_TRITON_TLS_CA_FILE"] = str(t.ca)
                env["SLUICE_FINE_TRITON_TLS_CERT_FILE"] = str(t.fine_client_cert)
                env["SLUICE_FINE_TRITON_TLS_KEY_FILE"] = str(t.fine_client_key)
        return env

    def channel(self, service: str) -> grpc.Channel:
        """A channel to a service as the launcher reaches it (TLS when the cluster has it)."""
        address = self.address(service)
        if self.tls is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, self.tls.channel_credentials())

    def _start_service(self, name: str) -> None:
        argv = [sys.executable, "-m", "sluice.cli", "serve", _service_of(name)]
        self._spawn(name, argv, self._service_env(name))

    def _start_redis(self) -> None:
        """The redis-server several gateways share: AOF with ``appendfsync always`` (what
        Track acknowledged is on disk), in ``event_log_dir/redis``."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        data = self.event_log_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port", str(self.ports.replicas["redis"]),
            "--bind", "127.0.0.1",
            "--dir", str(data.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        self._spawn("redis", argv, {**os.environ})

    def _start_lb(self) -> None:
        """HAProxy in front of the gateways, its configuration written to the log dir."""
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise StartupError("several gateways run behind HAProxy: apt-get install haproxy")
        if self.tls is not None:
            raise StartupError("the load balancer does not terminate TLS yet: use replicas=1")
        config = self.log_dir / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                bind=self.gateway_address,
                servers=[
                    Backend(n, f"127.0.0.1:{self.port_of(n)}")
                    for n in self.process_names("gateway")
                ],
                stats_bind=f"127.0.0.1:{self.ports.metrics['lb']}",
                health_service=STOREFRONT_SERVICE,
            )
        )
        self._spawn("lb", [binary, "-f", str(config.resolve()), "-db"], {**os.environ})

    def lb_servers(self) -> dict[str, str]:
        """HAProxy's view of each gateway: ``UP``, ``DOWN``, ``MAINT``, ... by name."""
        url = f"http://127.0.0.1:{self.ports.metrics['lb']}/stats;csv"
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            rows = csv.DictReader(resp.read().decode().lstrip("# ").splitlines())
            return {
                row["svname"]: row["status"]
                for row in rows
                if row["pxname"] == "gateways" and row["svname"] not in ("FRONTEND", "BACKEND")
            }

    def _wait_ready(self, name: str, deadline: float) -> None:
        """Until a process serves: Triton its model, redis PONG, HAProxy every gateway UP
        and a health check through it SERVING, a service its health SERVING."""
        if name == "triton":
            self._wait_triton(deadline)
        elif name == "redis":
            self._wait_redis(deadline)
        elif name == "lb":
            self._wait_lb(deadline)
        else:
            self._wait_health(name, self.port_of(name), deadline)

    def _wait_redis(self, deadline: float) -> None:
        import redis

        client = redis.Redis(port=self.ports.replicas["redis"], socket_timeout=1.0)
        try:
            while True:
                self._check_alive("redis")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise StartupError(f"redis not ready in time:\n{self.log_tail('redis')}")
                time.sleep(0.1)
        finally:
            client.close()

    def _wait_lb(self, deadline: float) -> None:
        gateways = set(self.process_names("gateway"))
        while True:
            self._check_alive("lb")
            try:
                states = self.lb_servers()
            except OSError:
                states = {}
            if gateways <= {n for n, state in states.items() if state == "UP"}:
                break
            if time.monotonic() > deadline:
                raise StartupError(f"haproxy: gateways {states} not all UP:\n{self.log_tail('lb')}")
            time.sleep(0.1)  # HAProxy checks every 250 ms; its stats are the only signal
        self._wait_health("lb", self.ports.gateway, deadline)

    def start_process(self, name: str) -> None:
        """Start one process on its port without waiting (``triton``, ``lb``, ``redis`` or a
        service's process name)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if name == "triton":
            self._start_triton()
        elif name == "lb":
            self._start_lb()
        elif name == "redis":
            self._start_redis()
        else:
            self._start_service(name)

    def health(self, name: str) -> int:
        """One health check of a service: its ``HealthCheckResponse`` status (UNKNOWN if down)."""
        with self.channel(name) as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
            except grpc.RpcError:
                return int(health_pb2.HealthCheckResponse.UNKNOWN)
            return int(resp.status)

    def wait_for_log(self, name: str, text: str, timeout_s: float = 60.0) -> None:
        """Wait until a process has written ``text`` to its log (it must stay alive)."""
        path = self.log_dir / f"{name}.log"
        deadline = time.monotonic() + timeout_s
        while not (path.exists() and text in path.read_text(errors="replace")):
            self._check_alive(name)
            if time.monotonic() > deadline:
                raise StartupError(f"{name} never logged {text!r}:\n{self.log_tail(name)}")
            time.sleep(0.1)  # a log file has no change notification worth the dependency

    def wait_serving(self, name: str, timeout_s: float = 120.0) -> None:
        """Wait until a service reports SERVING, or Triton serves the model (redis: answers,
        lb: HAProxy sees every gateway UP)."""
        self._wait_ready(name, time.monotonic() + timeout_s)

    def restart(self, name: str, kill: bool = False) -> None:
        """Stop one process (SIGKILL when ``kill``) and start it again, healthy."""
        proc = self.processes[name]
        restarted = self.restarts.get(name, 0)
        if kill:
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        if self.supervise:  # the supervisor starts it again; starting it here would race
            self.wait_restarted(name, restarted + 1)
        else:
            self.start_process(name)
        self._wait_ready(name, time.monotonic() + 120)

    # -- readiness ---------------------------------------------------------------
    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.poll() is not None:
            raise StartupError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _wait_health(self, name: str, port: int, deadline: float) -> None:
        with self.channel(name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(name)
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise StartupError(f"{name} not serving in time:\n{self.log_tail(name)}")
                # health has no push for "became SERVING" through Check; Watch would block
                # on a channel that is not up yet, so poll with a short back-off.
                time.sleep(0.2)

    def _wait_triton(self, deadline: float) -> None:
        url = f"http://127.0.0.1:{self.ports.triton_http}/v2/models/fine_ranker/ready"
        while True:
            self._check_alive("triton")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StartupError(f"triton not ready in time:\n{self.log_tail('triton')}")
            time.sleep(0.2)

    def triton_metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports.triton_metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return str(resp.read().decode())


def _service_of(process: str) -> str:
    """The service a process runs: ``recall-2`` a recall replica, ``shard-0`` a recall shard."""
    name = process.split("-")[0]
    return "recall" if name == "shard" else name


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group ``proc`` leads (it was started in a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_clusters_on_signals() -> None:
    """Turn SIGTERM/SIGINT into ``SystemExit`` in a command that starts a :class:`Cluster`.

    The exception unwinds through the ``with``/``finally`` blocks that stop the cluster, so
    killing a benchmark or an evaluation never leaves Triton and the services running.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)  # also when started in the background


def have_tritonserver() -> bool:
    return tritonserver_binary().exists() and shutil.which("python3") is not None
