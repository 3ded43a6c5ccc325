"""The liveness check of the podman overlay, run inside the container.

Kubernetes probes the services over gRPC health (plaintext, port 9090) and Triton over HTTP.
Debian's podman (4.3) turns only a liveness probe into a container health check, runs it as a
shell command inside the container, knows no gRPC probe, and does an HTTP probe with curl,
which the images do not carry. This script does the same checks with what the images have:

    python3 probe.py grpc 127.0.0.1:9090                     the server's health is SERVING
    python3 probe.py http http://127.0.0.1:8000/v2/health/live    the URL answers 200

It exits 0 when healthy and 1 otherwise, printing why.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_S = 2.0


def check_grpc(address: str) -> str | None:
    """None when the whole server (service "") reports SERVING, else what is wrong."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as err:
            return f"{address}: {err.code().name}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"
    return None


def check_http(url: str) -> str | None:
    """None when ``url`` answers 200, else what is wrong."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = int(response.status)
    except urllib.error.HTTPError as err:
        status = err.code
    except OSError as err:
        return f"{url}: {err}"
    return None if status == 200 else f"{url}: HTTP {status}"


def main(argv: list[str]) -> int:
    checks = {"grpc": check_grpc, "http": check_http}
    if len(argv) != 2 or argv[0] not in checks:
        print("usage: probe.py grpc HOST:PORT | probe.py http URL", file=sys.stderr)
        return 2
    problem = checks[argv[0]](argv[1])
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
