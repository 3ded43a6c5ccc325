"""Pytest plugin: a real ``redis-server`` on a free loopback port for the session.

Fixtures: ``redis_server`` (session; ``.host``, ``.port``, ``.url``) and
``redis_client`` (a flushed ``redis.Redis`` with ``decode_responses=True``).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from sluice.launch import free_port

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
