"""The merchant's rules in a cascade of real processes, called as a foreign client would.

The gateway reads its rules file (``SLUICE_GATEWAY_RULES_FILE``) and re-reads it when it
changes. Over plain gRPC stubs without a deadline: blocked content never appears on any
surface or page, also with the re-ranking process killed (-9); a rewritten rules file
applies without a restart; a broken one leaves the rules in force.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.experiments import write_experiments
from sluice.launch import Cluster
from sluice.rules import write_rules
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.integration


class Blocks:
    """What the rules block in the tiny catalog: its commonest brand and category, and the
    five most popular items of neither."""

    def __init__(self, a: Artifacts) -> None:
        c = self.catalog = a.catalog
        self.brand = Counter(c.brand_codes.tolist()).most_common(1)[0][0]
        self.category = Counter(c.category_codes.tolist()).most_common(1)[0][0]
        free = (c.brand_codes != self.brand) & (c.category_codes != self.category)
        by_popularity = np.argsort(-np.asarray(a.popularity), kind="stable")
        rows = [int(r) for r in by_popularity if free[r]]
        self.items = [int(c.item_ids[r]) for r in rows[:5]]
        self.pinned = int(c.item_ids[rows[5]])

    def spec(self, version: str, **more: Any) -> dict[str, Any]:
        c = self.catalog
        return {
            "version": version,
            "blocked": {
                "item_ids": self.items,
                "brands": [c.brands[self.brand]],
                "categories": [c.categories[self.category]],
            },
            "pins": [{"item_id": self.pinned, "position": 1, "surfaces": ["home"]}],
            **more,
        }

    def shown(self, item_ids: Any) -> list[int]:
        """Which of ``item_ids`` the rules block."""
        c = self.catalog
        ids = np.asarray(list(item_ids), np.int64)
        rows = c.rows(ids)
        bad = (
            np.isin(ids, self.items)
            | (c.brand_codes[rows] == self.brand)
            | (c.category_codes[rows] == self.category)
        )
        return ids[bad].tolist()


@pytest.fixture(scope="module")
def blocks(tiny_artifacts: Artifacts) -> Blocks:
    return Blocks(tiny_artifacts)


@pytest.fixture(scope="module")
def rules_path(tmp_path_factory: pytest.TempPathFactory, blocks: Blocks) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.json"
    write_rules(path, blocks.spec("v1"))
    return path


# The gateway watches an experiments file that holds none but while the experiments test
# runs: an A/A experiment (both arms keep the stage's settings) with a shadow arm.
NO_EXPERIMENTS = {"version": "off", "experiments": []}
EXPERIMENTS = {
    "version": "aa-1",
    "experiments": [
        {
            "name": "aa",
            "salt": "served",
            "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
            "shadow": {"name": "tail", "settings": {"exposure_tail_share": 0.8}},
        }
    ],
}


@pytest.fixture(scope="module")
def shadow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shadow")


@pytest.fixture(scope="module")
def experiments_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("experiments") / "experiments.json"
    write_experiments(path, NO_EXPERIMENTS)
    return path


@pytest.fixture(scope="module")
def ruled(
    tiny_artifacts: Artifacts,
    tmp_path_factory: pytest.TempPathFactory,
    rules_path: Path,
    shadow_dir: Path,
    experiments_path: Path,
) -> Iterator[Cluster]:
    env = {
        "SLUICE_GATEWAY_RULES_FILE": str(rules_path),
        "SLUICE_GATEWAY_RULES_POLL_S": "0.2",
        "SLUICE_GATEWAY_EXPERIMENTS_FILE": str(experiments_path),
        "SLUICE_GATEWAY_SHADOW_LOG_DIR": str(shadow_dir),
    }
    yield from running_cluster(tiny_artifacts, tmp_path_factory.mktemp("ruled"), extra_env=env)


def _stub(cluster: Cluster) -> storefront_pb2_grpc.StorefrontServiceStub:
    return storefront_pb2_grpc.StorefrontServiceStub(grpc.insecure_channel(cluster.gateway_address))


def _pages(call: Callable[[str], Any], pages: int = 4) -> Iterator[Any]:
    token = ""
    for _ in range(pages):
        response = call(token)  # no deadline: the gateway's default budget applies
        yield response
        token = response.next_page_token
        if not token:
            return


def _every_path(
    stub: storefront_pb2_grpc.StorefrontServiceStub, a: Artifacts
) -> Iterator[tuple[str, Any]]:
    users, _ = a.users()
    c = a.catalog
    for user in users[:10]:
        for r in _pages(
            lambda t, u=user: stub.Recommend(
                storefront_pb2.RecommendRequest(user_id=u, page_size=10, page_token=t)
            )
        ):
            yield "home", r
    for item in c.item_ids[::80].tolist():
        for r in _pages(
            lambda t, i=item: stub.Recommend(
                storefront_pb2.RecommendRequest(
                    surface=storefront_pb2.SURFACE_SIMILAR_ITEMS,
                    context_item_id=i,
                    page_size=10,
                    page_token=t,
                )
            )
        ):
            yield "similar", r
    for title in c.titles[::80]:
        query = " ".join(title.split()[:3])
        for r in _pages(
            lambda t, q=query: stub.Search(
                storefront_pb2.SearchRequest(query=q, page_size=10, page_token=t)
            )
        ):
            yield "search", r


def _check(
    stub: Any, a: Artifacts, blocks: Blocks, version: str, rerank_down: bool = False
) -> tuple[int, list[int]]:
    shown, bad = 0, []
    for _, response in _every_path(stub, a):
        assert response.rules_version == version
        assert response.stages[3].degraded == rerank_down
        shown += len(response.page.item_ids)
        bad += blocks.shown(response.page.item_ids)
    return shown, bad


def test_blocked_content_never_appears_over_grpc(
    ruled: Cluster, tiny_artifacts: Artifacts, blocks: Blocks
) -> None:
    shown, bad = _check(_stub(ruled), tiny_artifacts, blocks, "v1")
    assert shown > 500 and not bad, bad[:10]


def test_with_rerank_killed_the_gateway_keeps_the_rules(
    ruled: Cluster, tiny_artifacts: Artifacts, blocks: Blocks
) -> None:
    stub = _stub(ruled)
    users, histories = tiny_artifacts.users()
    proc = ruled.processes["rerank"]
    proc.kill()  # SIGKILL, and not supervised here: it stays down until restarted below
    proc.wait()
    try:
        shown, bad = _check(stub, tiny_artifacts, blocks, "v1", rerank_down=True)
        assert shown > 500 and not bad, bad[:10]
        for user in [u for u, h in zip(users, histories, strict=True) if blocks.pinned not in h][
            :5
        ]:
            page = stub.Recommend(storefront_pb2.RecommendRequest(user_id=user, page_size=10))
            assert page.page.item_ids[0] == blocks.pinned  # the gateway placed the pin
    finally:
        ruled.restart("rerank")  # healthy again for the other tests


def test_a_rewritten_rules_file_applies_without_a_restart_and_a_broken_one_is_ignored(
    ruled: Cluster, tiny_artifacts: Artifacts, blocks: Blocks, rules_path: Path
) -> None:
    stub = _stub(ruled)
    users, _ = tiny_artifacts.users()
    request = storefront_pb2.RecommendRequest(user_id=users[3], page_size=10)
    before = stub.Recommend(request)
    victims = [i for i in before.page.item_ids if i != blocks.pinned][:3]
    spec = blocks.spec("v2")
    spec["blocked"]["item_ids"] = blocks.items + victims
    pid = ruled.processes["gateway"].pid
    try:
        write_rules(rules_path, spec)
        after = _wait_for_version(stub, request, "v2")
        assert not set(victims) & set(after.page.item_ids)
        assert len(after.page.item_ids) == 10
        rules_path.write_text(json.dumps({"version": "v3", "blocked": {"brands": "oops"}}))
        _wait_for_metric(ruled, 'sluice_rules_reloads_total{result="error"}')
        still = stub.Recommend(request)
        assert still.rules_version == "v2" and not set(victims) & set(still.page.item_ids)
        assert ruled.processes["gateway"].pid == pid  # never restarted
    finally:
        write_rules(rules_path, blocks.spec("v1"))
        _wait_for_version(stub, request, "v1")


def test_blocked_queries_and_the_age_flag_over_grpc(
    ruled: Cluster, tiny_artifacts: Artifacts, blocks: Blocks, rules_path: Path
) -> None:
    stub = _stub(ruled)
    c = tiny_artifacts.catalog
    adult = Counter(k for k in c.category_codes.tolist() if k != blocks.category).most_common(1)[0][
        0
    ]
    spec = blocks.spec(
        "adult",
        age_restricted_categories=[c.categories[adult]],
        queries={"blocked": ["forbidden thing"]},
    )
    request = storefront_pb2.SearchRequest(query="forbidden thing", page_size=10)
    try:
        write_rules(rules_path, spec)
        blocked = _wait_for_version(stub, request, "adult")
        assert blocked.query_blocked and not blocked.page.item_ids
        rows = np.flatnonzero(c.category_codes == adult)[:8].tolist()
        hidden = shown = 0
        for row in rows:
            query = " ".join(c.titles[row].split()[:3])
            for flag in (False, True):
                page = stub.Search(
                    storefront_pb2.SearchRequest(
                        query=query, page_size=10, include_age_restricted=flag
                    )
                ).page
                n = int((c.category_codes[c.rows(np.asarray(page.item_ids))] == adult).sum())
                hidden, shown = (hidden + n, shown) if not flag else (hidden, shown + n)
        assert hidden == 0 and shown > 0
    finally:
        write_rules(rules_path, blocks.spec("v1"))
        _wait_for_version(stub, storefront_pb2.SearchRequest(query="x", page_size=1), "v1")


def _wait_for_version(stub: Any, request: Any, version: str, timeout_s: float = 20.0) -> Any:
    """Call until a response carries ``version`` (the watcher polls every 0.2 s)."""
    call = stub.Search if isinstance(request, storefront_pb2.SearchRequest) else stub.Recommend
    deadline = time.monotonic() + timeout_s
    while True:
        response = call(request, timeout=5)
        if response.rules_version == version or time.monotonic() > deadline:
            assert response.rules_version == version
            return response


def _metric(cluster: Cluster, line: str) -> float | None:
    """The gateway's value of the metric ``line`` (name and labels); None when absent."""
    url = f"http://127.0.0.1:{cluster.metrics_port_of('gateway')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    value = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
    return value[0] if value else None


def _wait_for_metric(cluster: Cluster, line: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = _metric(cluster, line)
        if (value is not None and value >= 1) or time.monotonic() > deadline:
            assert value is not None and value >= 1, f"{line} never counted"
            return


def _serving_experiments(stub: storefront_pb2_grpc.StorefrontServiceStub, version: str) -> None:
    """Wait until the gateway serves the experiments file of ``version``."""
    deadline = time.monotonic() + 20
    request = storefront_pb2.SearchRequest(query="shoes", page_size=1)
    while (served := stub.Search(request).experiments_version) != version:
        assert time.monotonic() < deadline, f"the gateway serves {served!r}, not {version!r}"


@pytest.fixture
def aa_experiment(ruled: Cluster, experiments_path: Path) -> Iterator[None]:
    """The A/A experiment in force for one test, and none again after it."""
    stub = _stub(ruled)
    write_experiments(experiments_path, EXPERIMENTS)
    _serving_experiments(stub, "aa-1")
    yield
    write_experiments(experiments_path, NO_EXPERIMENTS)
    _serving_experiments(stub, "off")


@pytest.mark.usefixtures("aa_experiment")
def test_experiment_arms_are_echoed_stable_and_the_shadow_is_logged(
    ruled: Cluster, tiny_artifacts: Artifacts, shadow_dir: Path
) -> None:
    stub = _stub(ruled)  # a plain generated stub, no deadline
    users = tiny_artifacts.users()[0][:12]
    arms = {}
    for user in users:
        first = stub.Recommend(storefront_pb2.RecommendRequest(user_id=user, page_size=5))
        again = stub.Recommend(storefront_pb2.RecommendRequest(user_id=user, page_size=5))
        assert first.experiments_version == "aa-1"
        assert [(a.experiment, a.arm) for a in first.experiment_arms] == [
            (a.experiment, a.arm) for a in again.experiment_arms
        ]
        arms[user] = first.experiment_arms[0].arm
        assert list(first.page.item_ids) == list(again.page.item_ids)
    assert set(arms.values()) == {"a", "b"}
    anonymous = stub.Search(storefront_pb2.SearchRequest(query="shoes", page_size=5))
    assert [(a.experiment, a.arm) for a in anonymous.experiment_arms] == [("aa", "a")]
    _wait_for_metric(ruled, 'sluice_experiment_requests_total{arm="b",experiment="aa"}')
    # Track labels each event with its user's arm: conversions are counted per arm
    item = int(tiny_artifacts.catalog.item_ids[0])
    tracked = stub.Track(
        storefront_pb2.TrackRequest(
            events=[
                storefront_pb2.Event(
                    event_id=f"aa-{user}-{time.time_ns()}",
                    user_id=user,
                    item_id=item,
                    type=storefront_pb2.EVENT_TYPE_PURCHASE,
                )
                for user in users
            ]
        )
    )
    assert set(tracked.statuses) == {storefront_pb2.EVENT_STATUS_ACCEPTED}
    for arm in ("a", "b"):
        line = f'sluice_experiment_events_total{{arm="{arm}",experiment="aa",type="purchase"}}'
        _wait_for_metric(ruled, line)
        assert _metric(ruled, line) == sum(a == arm for a in arms.values())
    # the shadow pages reach the log off the request path: wait for every user's lines
    deadline = time.monotonic() + 20
    while True:
        logs = list(shadow_dir.glob("shadow-*.jsonl"))
        lines = [json.loads(row) for f in logs for row in f.read_text().splitlines()]
        logged = {line["user_id"] for line in lines if line["kind"] == "recommend"}
        if logged >= set(users) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # between looks at the files; what ends the wait is the condition
    assert logged >= set(users)
    for line in lines:
        assert line["shadow_arm"] == "tail" and len(line["shadow_item_ids"]) == len(
            line["item_ids"]
        )
        if line["user_id"] in arms:
            assert line["arms"] == {"aa": arms[line["user_id"]]}
