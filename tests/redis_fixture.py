"""Pytest plugin: a real ``redis-server``, and a real Redis Cluster, on loopback ports.

Fixtures: ``redis_server`` (session; ``.host``, ``.port``, ``.url``) and
``redis_client`` (a flushed ``redis.Redis`` with ``decode_responses=True``);
``redis_cluster_server`` (session; a 3-master Redis Cluster made with
``redis-cli --cluster create``; ``.url`` is ``redis+cluster://...``) and
``redis_cluster_client`` (a flushed ``redis.cluster.RedisCluster``). ``start_redis_cluster``
starts one with replicas and AOF settings of a test's choosing (the failover tests).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from sluice.launch import free_port, free_ports

_READY = "Ready to accept connections"


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int
    process: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def start_redis(directory: Path, attempts: int = 5) -> RedisServer:
    """Start redis-server in ``directory``; return once it accepts connections."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    last_output = ""
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
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
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # the server logs readiness; no polling needed
            lines.append(line)
            if _READY in line:
                # Keep draining its log so the pipe never fills.
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return RedisServer("127.0.0.1", port, proc)
        proc.wait()
        last_output = "".join(lines)  # most likely the port was taken meanwhile
    raise RuntimeError(f"redis-server did not start:\n{last_output}")


def stop_redis(server: RedisServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        stop_redis(server)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


# -- Redis Cluster -------------------------------------------------------------------------


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/bin/{name}"


def _spawn_ready(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a redis-server; return it once it logs readiness, or it and its output once it
    exited (most likely a port was taken meanwhile)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if _READY in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, ""
    proc.wait()
    return proc, "".join(lines)


@dataclass
class ClusterNodeProcess:
    """One redis-server of a cluster: its client port, its cluster bus port, its process."""

    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[str]
    argv: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, socket_timeout: float | None = None) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=socket_timeout)

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class RedisClusterServer:
    """A Redis Cluster of redis-server processes on loopback."""

    nodes: list[ClusterNodeProcess]
    appendfsync: str | None = None
    killed: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node as a seed, the way a deployment names its cluster."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.live()[0].port, decode_responses=True)

    def live(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.alive()]

    def role(self, node: ClusterNodeProcess) -> tuple[str, int | None]:
        """``("master", None)`` or ``("slave", port of its master)``."""
        with node.client() as c:
            role = c.execute_command("ROLE")
        return (role[0], None) if role[0] == "master" else (role[0], int(role[2]))

    def masters(self) -> list[ClusterNodeProcess]:
        return [n for n in self.live() if self.role(n)[0] == "master"]

    def replica_of(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        for node in self.live():
            if self.role(node) == ("slave", master.port):
                return node
        raise LookupError(f"no replica of {master.address}")

    def kill(self, node: ClusterNodeProcess) -> None:
        """SIGKILL: no shutdown, no last AOF write."""
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        self.killed.append(node)

    def restart(self, node: ClusterNodeProcess) -> None:
        """Start a killed node again on its port, with its data and cluster config: a master
        that was failed over meanwhile rejoins as a replica of its successor."""
        proc, output = _spawn_ready(node.argv)
        if output:
            raise RuntimeError(f"redis-server {node.address} did not restart:\n{output}")
        node.process = proc
        self.killed.remove(node)
        self.wait_ok()

    def take_over(self, replica: ClusterNodeProcess) -> None:
        """Promote ``replica`` now (``CLUSTER FAILOVER TAKEOVER``: no agreement with its
        master, which is gone) and wait until every live node agrees the cluster is whole."""
        with replica.client() as c:
            c.execute_command("CLUSTER FAILOVER", "TAKEOVER")
        wait_until(lambda: self.role(replica)[0] == "master", "replica promoted")
        self.wait_ok()

    def _node_ok(self, node: ClusterNodeProcess, roles: dict[int, str]) -> bool:
        """This node serves every slot, knows every node, agrees with each live node on its
        role (a promotion has reached it) and, if a replica, is linked to its master."""
        with node.client(socket_timeout=2.0) as c:
            info = c.execute_command("CLUSTER INFO")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                return False
            role = c.execute_command("ROLE")
            if role[0] == "slave" and role[3] != "connected":
                return False  # still syncing from its master
            view = {
                int(address.split("@")[0].rsplit(":", 1)[1]): entry["flags"]
                for address, entry in c.execute_command("CLUSTER NODES").items()
            }
        return all(
            ("master" in view.get(port, "")) == (role == "master") for port, role in roles.items()
        )

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Poll every live node until it reports ``cluster_state:ok`` with all slots served,
        every node known and (replicas) their link to their master up."""

        def whole() -> bool:
            roles = {n.port: self.role(n)[0] for n in self.live()}
            return all(self._node_ok(n, roles) for n in self.live())

        wait_until(whole, "cluster_state:ok on every node", timeout_s)

    def flush(self) -> None:
        for node in self.masters():
            with node.client() as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll an observable condition (errors count as not yet) until it holds."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {timeout_s:.0f} s (last error: {last})")
        time.sleep(0.02)


def start_redis_cluster(
    directory: Path,
    masters: int = 3,
    replicas: int = 0,
    *,
    appendfsync: str | None = None,
    node_timeout_ms: int = 5000,
    attempts: int = 5,
) -> RedisClusterServer:
    """Start ``masters * (1 + replicas)`` cluster-enabled redis-servers on loopback ports below
    the ephemeral range (client and cluster-bus ports both chosen), join them with
    ``redis-cli --cluster create``, and return once every node reports ``cluster_state:ok``.

    ``appendfsync`` (``always``, ``everysec``) turns the AOF on with that policy."""
    count = masters * (1 + replicas)
    nodes: list[ClusterNodeProcess] = []
    try:
        for index in range(count):
            for attempt in range(attempts):
                port, bus = free_ports(2)
                node_dir = directory / f"node{index}"
                node_dir.mkdir(parents=True, exist_ok=True)
                argv = [
                    _binary("redis-server"),
                    "--port", str(port),
                    "--cluster-port", str(bus),
                    "--bind", "127.0.0.1",
                    "--dir", str(node_dir),
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--save", "",
                    "--appendonly", "yes" if appendfsync else "no",
                    "--appendfsync", appendfsync or "everysec",
                    "--repl-diskless-sync-delay", "0",  # a replica syncs at once
                    "--logfile", "",
                    "--daemonize", "no",
                ]  # fmt: skip
                proc, output = _spawn_ready(argv)
                if not output:
                    nodes.append(ClusterNodeProcess(port, bus, node_dir, proc, argv))
                    break
                if attempt == attempts - 1:
                    raise RuntimeError(f"redis-server (cluster node) did not start:\n{output}")
        create = subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *(n.address for n in nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}"
            )
        cluster = RedisClusterServer(nodes, appendfsync)
        cluster.wait_ok()
        return cluster
    except BaseException:
        RedisClusterServer(nodes).stop()
        raise


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """Three masters, no replicas, no AOF: the state store's tests on a cluster."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_client(redis_cluster_server: RedisClusterServer) -> Iterator[RedisCluster]:
    redis_cluster_server.flush()
    client = redis_cluster_server.client()
    try:
        yield client
    finally:
        client.close()
