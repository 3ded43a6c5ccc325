"""The ``sluice`` command's wiring, without running what it starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sluice import cli


def test_the_demo_builds_with_every_option_sluice_build_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make demo` on a fresh clone builds first. Its build arguments once lacked options
    `sluice build` had gained since, and the demo failed before building anything."""
    import sluice.build.pipeline as pipeline

    seen: list[Any] = []
    monkeypatch.setattr(pipeline, "build", seen.append)  # the options, not a real build
    args = cli.demo_build_args(tmp_path / "artifacts", items=700, users=300)
    assert cli._build(args) == 0
    (options,) = seen
    assert options.out == tmp_path / "artifacts"
    assert (options.shop.num_items, options.shop.num_users) == (700, 300)
    defaults = cli.command_parser().parse_args(["build"])
    assert options.epochs == defaults.epochs and options.encoder == defaults.encoder
    assert options.ranker.loss == defaults.loss and options.shards == 0
