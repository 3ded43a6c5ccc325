"""The experiments file (:mod:`sluice.experiments`): arms by a salted hash, its schema, the
watcher, and the re-ranking overrides an arm sends to the stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from sluice.common.v1 import common_pb2
from sluice.convert import context_from_proto, context_to_proto
from sluice.core.errors import InvalidArgument
from sluice.domain import FineOverrides, RankContext, RerankOverrides
from sluice.experiments import (
    RELOADS,
    ExperimentsError,
    ExperimentSet,
    ExperimentsFile,
    ExperimentsWatcher,
    read_experiments,
    write_experiments,
)

USERS = [f"user-{i}" for i in range(10_000)]


def spec(**experiment: Any) -> dict[str, Any]:
    base = {
        "name": "mmr",
        "salt": "s1",
        "arms": [
            {"name": "control", "weight": 50},
            {"name": "lambda-07", "weight": 50, "settings": {"diversity_lambda": 0.7}},
        ],
    }
    return {"version": "v1", "experiments": [base | experiment]}


def arms_of(experiments: ExperimentSet) -> list[str]:
    return [experiments.assign(u).arms[0][1] for u in USERS]


def test_arms_are_stable_per_user_and_split_by_weight() -> None:
    first = arms_of(ExperimentSet(ExperimentsFile.model_validate(spec())))
    again = arms_of(ExperimentSet(ExperimentsFile.model_validate(spec())))  # another replica
    assert first == again
    assert 0.47 < first.count("lambda-07") / len(USERS) < 0.53
    weighted = spec(
        arms=[
            {"name": "a", "weight": 90},
            {"name": "b", "weight": 9},
            {"name": "c", "weight": 1},
        ]
    )
    shares = np.unique(
        arms_of(ExperimentSet(ExperimentsFile.model_validate(weighted))), return_counts=True
    )
    assert dict(zip(shares[0], shares[1] / len(USERS), strict=True)) == pytest.approx(
        {"a": 0.9, "b": 0.09, "c": 0.01}, abs=0.012
    )


def test_a_new_salt_reshuffles_and_anonymous_shoppers_get_the_first_arm() -> None:
    first = arms_of(ExperimentSet(ExperimentsFile.model_validate(spec())))
    other = arms_of(ExperimentSet(ExperimentsFile.model_validate(spec(salt="s2"))))
    moved = np.mean([a != b for a, b in zip(first, other, strict=True)])
    assert 0.45 < moved < 0.55  # independent of the old split
    assignment = ExperimentSet(ExperimentsFile.model_validate(spec())).assign("")
    assert assignment.arms == (("mmr", "control"),) and assignment.rerank == RerankOverrides()


def test_an_arm_s_settings_and_the_shadow_reach_the_assignment() -> None:
    two = spec(shadow={"name": "tail", "settings": {"exposure_tail_share": 0.4}})
    two["experiments"].append(
        {
            "name": "caps",
            "salt": "c",
            "arms": [{"name": "cap-1", "settings": {"max_per_brand": 1}}],
        }
    )
    experiments = ExperimentSet(ExperimentsFile.model_validate(two))
    lam = next(u for u in USERS if experiments.assign(u).arms[0][1] == "lambda-07")
    a = experiments.assign(lam)
    assert a.arms == (("mmr", "lambda-07"), ("caps", "cap-1"))
    assert a.rerank == RerankOverrides(diversity_lambda=0.7, max_per_brand=1)
    assert a.shadows == (("mmr", "tail", RerankOverrides(exposure_tail_share=0.4)),)
    assert a.rerank.config_changes() == {"diversity_lambda": 0.7, "max_per_brand": 1}
    assert a.fine == FineOverrides()


def test_a_fusion_arm_reaches_the_fine_stage_s_part_of_the_assignment() -> None:
    fusion = spec(arms=[{"name": "ranker-alone", "settings": {"fusion_beta": 0.0}}])
    a = ExperimentSet(ExperimentsFile.model_validate(fusion)).assign("anyone")
    assert a.fine == FineOverrides(fusion_beta=0.0) and a.rerank == RerankOverrides()
    model = spec(arms=[{"name": "v2", "settings": {"ranker_model": "fine_ranker:2"}}])
    a = ExperimentSet(ExperimentsFile.model_validate(model)).assign("anyone")
    assert a.fine == FineOverrides(model="fine_ranker:2")


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"name": "Bad Name"}, "experiments.0.name"),
        ({"salt": ""}, "experiments.0.salt"),
        ({"arms": [{"name": "a", "weight": 0}]}, "weights add up to 0"),
        ({"arms": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"arms": [{"name": "a", "settings": {"diversity_lambda": 1.5}}]}, "diversity_lambda"),
        ({"arms": [{"name": "a", "settings": {"max_per_brand": 101}}]}, "max_per_brand"),
        ({"arms": [{"name": "a", "settings": {"colour": "red"}}]}, "colour"),
        ({"arms": []}, "experiments.0.arms"),
        ({"arms": [{"name": "a", "settings": {"fusion_beta": -1}}]}, "fusion_beta"),
        (
            {"shadow": {"name": "s", "settings": {"fusion_beta": 2.0}}},
            "re-ranking settings only",
        ),
        ({"arms": [{"name": "a", "settings": {"ranker_model": "a b"}}]}, "ranker_model"),
        ({"arms": [{"name": "a", "settings": {"ranker_model": "m:v1"}}]}, "ranker_model"),
        (
            {"shadow": {"name": "s", "settings": {"ranker_model": "mlp_ranker"}}},
            "re-ranking settings only",
        ),
    ],
)
def test_a_bad_file_names_what_is_wrong(tmp_path: Path, change: dict[str, Any], where: str) -> None:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(spec(**change)))
    with pytest.raises(ExperimentsError, match=where):
        read_experiments(path)


def test_two_experiments_may_not_change_the_same_setting(tmp_path: Path) -> None:
    both = spec()
    both["experiments"].append(
        {"name": "other", "salt": "o", "arms": [{"name": "x", "settings": {"diversity_lambda": 1}}]}
    )
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(both))
    with pytest.raises(ExperimentsError, match="both change diversity_lambda"):
        read_experiments(path)


def test_the_watcher_swaps_a_new_file_and_keeps_the_old_on_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(spec()))
    watcher = ExperimentsWatcher(path)
    assert watcher.current.version == "v1" and not watcher.check()
    path.write_text(json.dumps(spec() | {"version": "v2"}))
    assert watcher.check() and watcher.current.version == "v2"
    errors = RELOADS.labels("error")._value.get()
    path.write_text("{not json")
    assert not watcher.check() and watcher.current.version == "v2"
    assert RELOADS.labels("error")._value.get() == errors + 1


def test_write_experiments_refuses_a_bad_file_and_the_example_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "experiments.json"
    write_experiments(path, spec())
    assert read_experiments(path).version == "v1"
    with pytest.raises(ValidationError, match="version"):
        write_experiments(path, spec() | {"version": ""})
    assert read_experiments(path).version == "v1"  # the file in force is untouched
    example = read_experiments(Path(__file__).parents[2] / "deploy/experiments/example.json")
    mmr, _fusion = example.experiments
    assert [a.name for a in mmr.arms] == ["control", "lambda-07"] and mmr.shadow is not None


def test_overrides_cross_the_wire_and_bad_ones_are_invalid_argument() -> None:
    ctx = RankContext(rerank=RerankOverrides(diversity_lambda=0.0, exposure_tail_share=0.5))
    back = context_from_proto(context_to_proto(ctx))
    assert back.rerank == ctx.rerank  # 0.0 is set, not unset
    assert context_from_proto(context_to_proto(RankContext())).rerank == RerankOverrides()
    for name, value in (
        ("diversity_lambda", float("nan")),
        ("diversity_lambda", 1.5),
        ("exposure_tail_share", -0.1),
        ("max_per_brand", 101),
        ("max_per_brand", -1),
    ):
        msg = common_pb2.RankContext(rerank=common_pb2.RerankOverrides(**{name: value}))
        with pytest.raises(InvalidArgument) as err:
            context_from_proto(msg)
        assert err.value.field_path == f"context.rerank.{name}"
    fine = RankContext(fine=FineOverrides(fusion_beta=0.0))
    assert context_from_proto(context_to_proto(fine)).fine == FineOverrides(0.0)
    assert context_from_proto(context_to_proto(RankContext())).fine == FineOverrides()
    for beta in (float("nan"), float("inf"), -0.5, 100.5):
        msg = common_pb2.RankContext(fine=common_pb2.FineOverrides(fusion_beta=beta))
        with pytest.raises(InvalidArgument) as err:
            context_from_proto(msg)
        assert err.value.field_path == "context.fine.fusion_beta"
    arm = RankContext(fine=FineOverrides(model="mlp_ranker:7"))
    assert context_from_proto(context_to_proto(arm)).fine == FineOverrides(model="mlp_ranker:7")
    for model in ("../etc", "m:", "m" * 200, "m:x", "m\n"):
        msg = common_pb2.RankContext(fine=common_pb2.FineOverrides(model=model))
        with pytest.raises(InvalidArgument) as err:
            context_from_proto(msg)
        assert err.value.field_path == "context.fine.model"


def test_arm_rules_are_validated_like_a_rules_file(tmp_path: Path) -> None:
    arms = [
        {"name": "control"},
        {"name": "strict", "settings": {"rules": {"version": "r1", "blocked": {"brands": ["X"]}}}},
    ]
    good = {"version": "1", "experiments": [{"name": "e", "salt": "s", "arms": arms}]}
    path = tmp_path / "experiments.json"
    write_experiments(path, good)
    experiments = ExperimentSet(read_experiments(path))
    rules = {experiments.assign(f"u{i}").rules is None for i in range(200)}
    assert rules == {True, False}  # the strict arm's users get rules, the control's none
    bad_rules = json.loads(json.dumps(good))
    bad_rules["experiments"][0]["arms"][1]["settings"]["rules"]["blocked"]["colour"] = ["red"]
    path.write_text(json.dumps(bad_rules))
    with pytest.raises(ExperimentsError, match="rules"):
        read_experiments(path)
    shadow = json.loads(json.dumps(good))
    shadow["experiments"][0]["shadow"] = arms[1] | {"name": "shadowed"}
    path.write_text(json.dumps(shadow))
    with pytest.raises(ExperimentsError, match="re-ranking settings only"):
        read_experiments(path)
    twice = json.loads(json.dumps(good))
    twice["experiments"].append({"name": "f", "salt": "t", "arms": arms})
    path.write_text(json.dumps(twice))
    with pytest.raises(ExperimentsError, match="both change rules"):
        read_experiments(path)
