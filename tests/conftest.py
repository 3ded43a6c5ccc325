"""Shared fixtures: a real Redis, and a tiny but real build of the generated shop."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.artifacts import Artifacts

pytest_plugins = ["tests.redis_fixture"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """A complete `sluice build` of a small generated shop (real MiniLM, FAISS, ranker)."""
    from sluice.build.pipeline import BuildOptions, build
    from sluice.data.synthetic import ShopSpec
    from sluice.fine.model import RankerConfig

    root = tmp_path_factory.mktemp("build")
    options = BuildOptions(
        out=root / "artifacts",
        shop=ShopSpec(num_items=800, num_users=600, mean_events_per_user=12, seed=3),
        model_repository=root / "model_repository",
        epochs=30,
        ranker=RankerConfig(dim=64, layers=2, patience=3),
        coarse_users=300,
        cache_dir=ROOT / "var" / "cache",
        progress=False,
    )
    return build(options)
