"""Processes start in any order: the fine service waits for Triton instead of dying.

On Kubernetes (and on a fast CI machine) the fine ranking pod can be up before Triton has
loaded the model. The service must stay alive and NOT_SERVING until Triton answers, then
serve, without a restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from sluice.artifacts import Artifacts
from sluice.launch import Cluster, Ports, have_tritonserver

pytestmark = pytest.mark.skipif(not have_tritonserver(), reason="tritonserver not installed")


def test_fine_service_started_before_triton_waits_then_serves(
    tiny_artifacts: Artifacts, tmp_path: Path
) -> None:
    c = Cluster(
        artifacts=tiny_artifacts.root,
        ports=Ports.random(),
        log_dir=tmp_path / "logs",
        event_log_dir=tmp_path / "events",
    )
    try:
        c.start_process("fine")  # Triton's port is allocated, nothing listens on it yet
        c.wait_for_log("fine", "waiting for triton", timeout_s=120)
        assert c.processes["fine"].poll() is None
        assert c.health("fine") == health_pb2.HealthCheckResponse.NOT_SERVING

        c.start_process("triton")
        c.wait_serving("fine", timeout_s=240)
        assert c.processes["fine"].poll() is None
    finally:
        c.stop()
