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


def test_generate_writes_the_shop_a_build_trains_on(tmp_path: Path) -> None:
    """`sluice generate` writes the generated shop as a dataset directory that loads back as
    the shop `sluice build` generates with the same options: items, brands and the log."""
    import numpy as np

    from sluice.data.interactions import load_data
    from sluice.data.synthetic import ShopSpec, generate_shop

    out = tmp_path / "shop"
    args = cli.command_parser().parse_args(
        ["generate", str(out), "--items", "300", "--users", "120", "--seed", "3"]
    )
    assert args.fn(args) == 0
    catalog, interactions = load_data(out)
    want_catalog, want = generate_shop(ShopSpec(num_items=300, num_users=120, seed=3))
    assert np.array_equal(catalog.item_ids, want_catalog.item_ids)
    assert catalog.titles == want_catalog.titles
    assert [catalog.brand_of(r) for r in range(len(catalog))] == [
        want_catalog.brand_of(r) for r in range(len(want_catalog))
    ]
    assert np.array_equal(catalog.price_cents, want_catalog.price_cents)
    assert interactions.user_ids == want.user_ids
    assert np.array_equal(interactions.item_rows, want.item_rows)
    assert np.array_equal(interactions.timestamps, want.timestamps)


@pytest.mark.parametrize(
    "argv",
    [["up", "--pin-cpus"], ["bench", "load", "--start", "--pin-cpus", "--artifacts", "x"]],
)
def test_pinning_outside_the_one_machine_layout_is_refused_with_a_message(
    argv: list[str],
) -> None:
    with pytest.raises(SystemExit, match="--pin-cpus needs") as exit_:
        cli.main(argv)
    assert "--stages local" in str(exit_.value)


def test_sluice_up_passes_pinning_to_the_cluster() -> None:
    args = cli.command_parser().parse_args(["up", "--stages", "local", "--pin-cpus"])
    cluster: Any = cli._cluster(args)
    assert cluster.pin_cpus and cluster.stages == "local"
    assert not cli._cluster(cli.command_parser().parse_args(["up"])).pin_cpus  # type: ignore[attr-defined]
