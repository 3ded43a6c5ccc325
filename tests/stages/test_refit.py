"""`sluice build --refit` fits the coarse weights and the fusion exactly as the build did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sluice.artifacts import Artifacts


def test_refit_reproduces_the_builds_fits(tiny_artifacts: Artifacts, tmp_path: Path) -> None:
    from sluice.build.pipeline import BuildOptions, refit
    from sluice.data.synthetic import ShopSpec

    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, copy)
    for name in ("coarse.json", "fusion.json"):
        (copy / name).unlink()
    shop = ShopSpec(num_items=800, num_users=600, mean_events_per_user=12, seed=3)  # conftest's
    refit(BuildOptions(out=copy, shop=shop, coarse_users=300, progress=False))
    for name in ("coarse.json", "fusion.json"):
        built = json.loads((tiny_artifacts.root / name).read_text())
        again = json.loads((copy / name).read_text())
        assert again.keys() == built.keys()
        for key, value in built.items():
            if key == "features" or isinstance(value, str):  # names, the signals' ranker
                assert again[key] == value, (name, key)
            else:
                assert again[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)


def test_refit_refuses_a_build_of_other_data(tiny_artifacts: Artifacts, tmp_path: Path) -> None:
    from sluice.build.pipeline import BuildOptions, refit
    from sluice.data.synthetic import ShopSpec

    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts.root, copy)
    with pytest.raises(ValueError, match="other data"):
        refit(BuildOptions(out=copy, shop=ShopSpec(num_items=900, num_users=600, seed=3)))
