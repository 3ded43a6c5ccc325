from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.artifacts import Artifacts
from sluice.launch import Cluster, Ports


def running_cluster(
    artifacts: Artifacts, base: Path, stages: str = "grpc", **options: Any
) -> Iterator[Cluster]:
    """A started cluster on free ports with its logs and events under ``base``; stopped after.
    ``options`` go to :class:`Cluster` (``supervise``, ``tls``, ``api_keys``)."""
    c = Cluster(
        artifacts=artifacts.root,
        ports=Ports.random(),
        log_dir=base / "logs",
        event_log_dir=base / "events",
        stages=stages,
        **options,
    )
    c.start(timeout_s=240)
    yield c
    c.stop()


@pytest.fixture(scope="package")
def cluster(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Triton and all five services as separate processes on free ports."""
    yield from running_cluster(tiny_artifacts, tmp_path_factory.mktemp("cluster"))
