from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.artifacts import Artifacts
from sluice.launch import Cluster, Ports


@pytest.fixture(scope="package")
def cluster(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Triton and all five services as separate processes on free ports."""
    base: Path = tmp_path_factory.mktemp("cluster")
    c = Cluster(
        artifacts=tiny_artifacts.root,
        ports=Ports.random(),
        log_dir=base / "logs",
        event_log_dir=base / "events",
    )
    c.start(timeout_s=240)
    yield c
    c.stop()
