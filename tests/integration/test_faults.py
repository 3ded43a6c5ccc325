"""Faults in a cascade of real processes: a stage down degrades the page, never fails it.

The cluster is this module's own, so breaking it disturbs no other test; each test breaks a
different process and asserts only about that one, so they pass in any order.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from sluice.artifacts import Artifacts
from sluice.client import StorefrontClient
from sluice.launch import Cluster
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def faulty(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from running_cluster(tiny_artifacts, tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def known_user(tiny_artifacts: Artifacts) -> str:
    ids, histories = tiny_artifacts.users()
    return ids[max(range(len(ids)), key=lambda i: len(histories[i]))]


def test_fine_ranker_outage_degrades_instead_of_failing(faulty: Cluster, known_user: str) -> None:
    proc = faulty.processes["triton"]
    proc.kill()
    proc.wait()
    client = StorefrontClient(faulty.gateway_address)
    resp = client.recommend(known_user, page_size=5, timeout_s=5)
    assert len(resp.page.item_ids) == 5
    fine = resp.stages[2]
    assert fine.degraded and fine.degraded_reason
    assert not resp.stages[0].degraded
    assert len(resp.page.fine_scores) == 0  # no fine scores to show: the stage did not run


def test_sigterm_drains_a_service_and_the_gateway_degrades(faulty: Cluster) -> None:
    proc = faulty.processes["rerank"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert '"msg": "stopped"' in faulty.log_tail("rerank", 5)
    client = StorefrontClient(faulty.gateway_address)
    resp = client.recommend("u", page_size=4, timeout_s=5)
    assert len(resp.page.item_ids) == 4
    assert resp.stages[3].degraded


def test_recall_killed_degrades_to_the_gateways_fallback(faulty: Cluster, known_user: str) -> None:
    proc = faulty.processes["recall"]
    proc.kill()
    proc.wait()
    client = StorefrontClient(faulty.gateway_address)
    resp = client.recommend(known_user, page_size=6, timeout_s=5)
    assert len(resp.page.item_ids) == 6
    assert resp.stages[0].degraded and resp.stages[0].degraded_reason
    search = client.search("shoes", page_size=4, timeout_s=5)
    assert len(search.page.item_ids) == 4 and search.stages[0].degraded
