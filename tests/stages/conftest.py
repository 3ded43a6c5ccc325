from __future__ import annotations

from typing import Any

import pytest

from sluice.artifacts import Artifacts
from sluice.domain import StageName
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.stages import LocalStage
from sluice.recall.engine import RecallEngine
from sluice.wiring import load_engines


@pytest.fixture(scope="session")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="session")
def engines(tiny_artifacts: Artifacts) -> dict[StageName, Any]:
    """Every stage's engine, loaded through the services' wiring (the ranker in process)."""
    return load_engines(tiny_artifacts.root, [], {"fine": {"backend": "torch"}})


@pytest.fixture(scope="session")
def recaller(engines: dict[StageName, Any]) -> RecallEngine:
    engine: RecallEngine = engines[StageName.RECALL]
    return engine


@pytest.fixture(scope="session")
def local_stages(engines: dict[StageName, Any]) -> dict[StageName, LocalStage]:
    return {stage: LocalStage(stage, engine) for stage, engine in engines.items()}
