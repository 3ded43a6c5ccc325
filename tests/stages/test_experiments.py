"""Experiments through the gateway and the real stages in process: each user is served by
their arm's settings, and the shadow arm's pages are logged off the request path."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from sluice.artifacts import Artifacts
from sluice.domain import StageName
from sluice.embed.text import MiniLMEncoder
from sluice.experiments import ExperimentsWatcher
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import FusionWeights
from sluice.gateway.pipeline import Gateway, QueryEncoder
from sluice.gateway.shadow import SHADOW_PAGES, ShadowArms
from sluice.gateway.stages import LocalStage
from sluice.gateway.users import UserHistory, item_attributes
from sluice.rerank.engine import RerankEngine
from sluice.state.store import InMemoryStateStore

SPEC = {
    "version": "exp-1",
    "experiments": [
        {
            "name": "mmr",
            "salt": "test",
            "arms": [
                {"name": "control", "weight": 1},
                {
                    "name": "relevance",
                    "weight": 1,
                    "settings": {"diversity_lambda": 1.0, "max_per_brand": 0},
                },
            ],
            "shadow": {"name": "tail", "settings": {"exposure_tail_share": 0.8}},
        }
    ],
}


@pytest.fixture(scope="module")
def experiments_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("experiments") / "experiments.json"
    path.write_text(json.dumps(SPEC))
    return path


def gateway(
    stages: Mapping[StageName, Any],
    a: Artifacts,
    encoder: MiniLMEncoder,
    experiments: ExperimentsWatcher | None = None,
    shadow: ShadowArms | None = None,
) -> Gateway:
    store = InMemoryStateStore(item_attributes(a.catalog))
    return Gateway(
        stages,
        a.catalog,
        UserHistory.from_artifacts(a, store),
        QueryEncoder(encoder.encode),
        experiments=experiments,
        shadow=shadow,
    )


def rerank_with(stages: Mapping[StageName, LocalStage], **changes: Any) -> dict[StageName, Any]:
    """The stages with re-ranking configured as an arm asks (the stage's own settings)."""
    engine: RerankEngine = stages[StageName.RERANK].engine
    config = dataclasses.replace(engine.config, **changes)
    changed = RerankEngine(engine.catalog, engine.vectors, config, engine.tail)
    return dict(stages) | {StageName.RERANK: LocalStage(StageName.RERANK, changed)}


def page(g: Gateway, user: str) -> list[int]:
    return g.recommend(user_id=user, page_size=10).candidates.item_ids.tolist()


def test_each_user_is_served_by_their_arm(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    experiments_file: Path,
) -> None:
    a = tiny_artifacts
    experimented = gateway(local_stages, a, encoder, ExperimentsWatcher(experiments_file))
    control = gateway(local_stages, a, encoder)
    relevance = gateway(
        rerank_with(local_stages, diversity_lambda=1.0, max_per_brand=0), a, encoder
    )
    users = a.users()[0][:40]
    arms, differs = [], 0
    for user in users:
        result = experimented.recommend(user_id=user, page_size=10)
        assert result.experiments_version == "exp-1"
        arm = dict(result.experiment_arms)["mmr"]
        arms.append(arm)
        assert experimented.recommend(user_id=user, page_size=10).experiment_arms == (
            ("mmr", arm),
        )  # the same arm on every request
        expected = page(control if arm == "control" else relevance, user)
        assert result.candidates.item_ids.tolist() == expected
        differs += arm == "relevance" and expected != page(control, user)
    assert {"control", "relevance"} == set(arms)
    assert differs > 0  # the arm's settings changed some pages: the check above can fail


def test_a_fusion_arm_is_served_as_the_fine_stage_with_its_beta(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    tmp_path: Path,
) -> None:
    a = tiny_artifacts
    path = tmp_path / "fusion.json"
    arms = [{"name": "build"}, {"name": "alone", "settings": {"fusion_beta": 0.0}}]
    path.write_text(
        json.dumps({"version": "f", "experiments": [{"name": "fusion", "salt": "f", "arms": arms}]})
    )
    experimented = gateway(local_stages, a, encoder, ExperimentsWatcher(path))
    fine: FineEngine = local_stages[StageName.FINE_RANK].engine
    assert fine.fusion.beta(False) != 0.0  # else both arms would serve the same pages
    alone = FineEngine(fine.catalog, fine.backend, FusionWeights(0.0, 0.0))
    ranker_alone = gateway(
        dict(local_stages) | {StageName.FINE_RANK: LocalStage(StageName.FINE_RANK, alone)},
        a,
        encoder,
    )
    control = gateway(local_stages, a, encoder)
    seen, differs = set(), 0
    for user in a.users()[0][:30]:
        result = experimented.recommend(user_id=user, page_size=10)
        arm = dict(result.experiment_arms)["fusion"]
        seen.add(arm)
        expected = page(ranker_alone if arm == "alone" else control, user)
        assert result.candidates.item_ids.tolist() == expected
        differs += arm == "alone" and expected != page(control, user)
    assert seen == {"build", "alone"} and differs > 0


def test_the_shadow_arm_is_logged_beside_the_served_page(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    experiments_file: Path,
    tmp_path: Path,
) -> None:
    a = tiny_artifacts
    shadow = ShadowArms(tmp_path / "shadow")
    experimented = gateway(local_stages, a, encoder, ExperimentsWatcher(experiments_file), shadow)
    users = a.users()[0][:20]
    served = {u: experimented.recommend(user_id=u, page_size=10) for u in users}
    shadow.drain()
    lines = [json.loads(line) for line in shadow.path.read_text().splitlines()]
    assert sorted(line["user_id"] for line in lines) == sorted(users)
    tail_control = gateway(rerank_with(local_stages, tail_share=0.8), a, encoder)
    moved = 0
    for line in lines:
        result = served[line["user_id"]]
        assert line["item_ids"] == result.candidates.item_ids.tolist()
        assert line["arms"] == {"mmr": dict(result.experiment_arms)["mmr"]}
        assert line["experiment"] == "mmr" and line["shadow_arm"] == "tail"
        if line["arms"]["mmr"] == "control":  # the shadow on top of the control's settings
            assert line["shadow_item_ids"] == page(tail_control, line["user_id"])
            moved += line["shadow_item_ids"] != line["item_ids"]
    assert moved > 0
    shadow.close()


def test_a_full_shadow_queue_drops_the_shadow_and_serves_the_page(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    experiments_file: Path,
    tmp_path: Path,
) -> None:
    shadow = ShadowArms(tmp_path, max_pending=0)
    experimented = gateway(
        local_stages, tiny_artifacts, encoder, ExperimentsWatcher(experiments_file), shadow
    )
    dropped = SHADOW_PAGES.labels("mmr", "tail", "dropped")._value.get()
    user = tiny_artifacts.users()[0][0]
    assert len(experimented.recommend(user_id=user, page_size=10).candidates) == 10
    assert SHADOW_PAGES.labels("mmr", "tail", "dropped")._value.get() == dropped + 1
    shadow.drain()
    assert shadow.path.read_text() == ""
    shadow.close()


def test_an_arm_serves_its_own_rules(
    local_stages: Mapping[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    tmp_path: Path,
) -> None:
    """An arm whose rules block the brand its users would see most: none of them sees it,
    the control users still do, and each page names the rules that served it."""
    c = tiny_artifacts.catalog
    users, _ = tiny_artifacts.users()
    plain = gateway(local_stages, tiny_artifacts, encoder)
    pages = {u: plain.recommend(user_id=u, page_size=10, deadline_s=30.0) for u in users[:60]}
    brands = [c.brand_of(c.row(int(i))) for p in pages.values() for i in p.candidates.item_ids]
    brand = max(set(brands), key=brands.count)
    blocked_rules = {"version": "arm-rules-1", "blocked": {"brands": [brand]}}
    spec = {
        "version": "exp-rules",
        "experiments": [
            {
                "name": "rules",
                "salt": "r",
                "arms": [
                    {"name": "control", "weight": 1},
                    {"name": "strict", "weight": 1, "settings": {"rules": blocked_rules}},
                ],
            }
        ],
    }
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(spec))
    watcher = ExperimentsWatcher(path)
    g = gateway(local_stages, tiny_artifacts, encoder, experiments=watcher)
    shown = {"control": 0, "strict": 0}
    for user in users[:60]:
        arm = watcher.current.assign(user).arms[0][1]
        result = g.recommend(user_id=user, page_size=10, deadline_s=30.0)
        assert result.experiment_arms == (("rules", arm),)
        assert result.rules_version == ("arm-rules-1" if arm == "strict" else "")
        seen = [c.brand_of(c.row(int(i))) for i in result.candidates.item_ids]
        shown[arm] += seen.count(brand)
        query = g.search(query=f"{brand} shoes", user_id=user, page_size=10, deadline_s=30.0)
        if arm == "strict":
            assert brand not in [c.brand_of(c.row(int(i))) for i in query.candidates.item_ids]
    assert shown["strict"] == 0 and shown["control"] > 0, shown
