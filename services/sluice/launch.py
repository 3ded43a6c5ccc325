"""Start Triton and every service as separate processes, wait on their health.

Used by ``sluice up`` / ``sluice demo`` and by the integration tests, so the
tests exercise exactly what an operator runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
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
from sluice.tools.triton_setup import backend_dir, install_stub, triton_env, tritonserver_binary

STAGES = ("recall", "coarse", "fine", "rerank")

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
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    """How often the supervisor restarted each process."""
    _launch: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(
        default_factory=lambda: threading.Condition(threading.RLock())
    )

    # -- lifecycle ---------------------------------------------------------------
    def start(self, timeout_s: float = 180.0, progress: bool = False) -> Cluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        try:
            stage_services = STAGES if self.stages == "grpc" else ()
            if self.fine_backend == "triton":
                self._start_triton()
            for name in stage_services:
                self._start_service(name)
            if self.fine_backend == "triton":
                self._wait_triton(deadline)
                if progress:
                    print(f"  triton    grpc 127.0.0.1:{self.ports.triton_grpc}  ready", flush=True)
            for name in stage_services:
                self._wait_health(name, getattr(self.ports, name), deadline)
                if progress:
                    print(
                        f"  {name:<9} grpc 127.0.0.1:{getattr(self.ports, name)}  serving",
                        flush=True,
                    )
            self._start_service("gateway")
            self._wait_health("gateway", self.ports.gateway, deadline)
            if progress:
                print(f"  gateway   grpc 127.0.0.1:{self.ports.gateway}  serving", flush=True)
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
        for name in ["gateway", *STAGES, "triton"]:
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
        """Where a service (gateway, recall, coarse, fine, rerank) listens."""
        return f"127.0.0.1:{getattr(self.ports, service)}"

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    # -- processes ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
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
        repo = Artifacts(self.artifacts).model_repository
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
        ]
        if self.triton_gpu:
            argv.append("--model-config-name=gpu")
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

    def _service_env(self, name: str) -> dict[str, str]:
        env = {**CPU_SHARING_ENV, **os.environ}
        env.update(self.extra_env)
        p = self.ports
        prefix = f"SLUICE_{name.upper()}_"
        env[prefix + "ARTIFACTS"] = str(self.artifacts.resolve())
        env[prefix + "PORT"] = str(getattr(p, name))
        env[prefix + "METRICS_PORT"] = str(p.metrics[name])
        if name == "fine" or (name == "gateway" and self.stages == "local"):
            env["SLUICE_FINE_BACKEND"] = self.fine_backend
            env["SLUICE_FINE_TRITON_URL"] = f"127.0.0.1:{p.triton_grpc}"
        if name == "gateway":
            env[prefix + "STAGES"] = self.stages
            env[prefix + "RECALL_ADDR"] = f"127.0.0.1:{p.recall}"
            env[prefix + "COARSE_ADDR"] = f"127.0.0.1:{p.coarse}"
            env[prefix + "FINE_ADDR"] = f"127.0.0.1:{p.fine}"
            env[prefix + "RERANK_ADDR"] = f"127.0.0.1:{p.rerank}"
            env[prefix + "EVENT_LOG_DIR"] = str(self.event_log_dir.resolve())
            env[prefix + "STATE"] = self.state
            if self.redis_url:
                env[prefix + "REDIS_URL"] = self.redis_url
        if name == "recall":
            # with a shared (redis) store, recall blends live popularity into its popularity
            env[prefix + "STATE"] = self.state
            if self.state == "redis" and self.redis_url:
                env[prefix + "REDIS_URL"] = self.redis_url
        if name == "gateway" and self.api_keys:
            env[prefix + "API_KEYS"] = json.dumps(list(self.api_keys))
        if self.tls is not None:
            t = self.tls
            env[prefix + "TLS_CERT_FILE"] = str(t.server_cert)
            env[prefix + "TLS_KEY_FILE"] = str(t.server_key)
            if name == "gateway":
                env[prefix + "STAGE_TLS_CA_FILE"] = str(t.ca)
                env[prefix + "STAGE_TLS_CERT_FILE"] = str(t.gateway_client_cert)
                env[prefix + "STAGE_TLS_KEY_FILE"] = str(t.gateway_client_key)
            else:  # a stage serves only the gateway's identity
                env[prefix + "TLS_CLIENT_CA_FILE"] = str(t.ca)
                env[prefix + "ALLOWED_PEERS"] = json.dumps([t.gateway_identity])
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
        self._spawn(
            name, [sys.executable, "-m", "sluice.cli", "serve", name], self._service_env(name)
        )

    def start_process(self, name: str) -> None:
        """Start one process on its port without waiting (``triton`` or a service name)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if name == "triton":
            self._start_triton()
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
        """Wait until a service reports SERVING, or Triton serves the model."""
        deadline = time.monotonic() + timeout_s
        if name == "triton":
            self._wait_triton(deadline)
        else:
            self._wait_health(name, getattr(self.ports, name), deadline)

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
            self._start_service(name)
        self._wait_health(name, getattr(self.ports, name), time.monotonic() + 120)

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
