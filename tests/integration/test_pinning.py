"""``sluice up --stages local --pin-cpus``: the gateway on a core of its own, Triton and its
python-backend stub on the rest, for every thread, and again after a kill -9."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.artifacts import Artifacts
from sluice.bench.load import process_tree
from sluice.client import StorefrontClient
from sluice.launch import Cluster
from tests.integration.conftest import running_cluster

CORES = sorted(os.sched_getaffinity(0))

pytestmark = pytest.mark.integration
CAN_PIN = pytest.mark.skipif(
    len(CORES) < 2 or shutil.which("taskset") is None, reason="pinning needs two cores and taskset"
)


def _threads_cores(pid: int) -> set[frozenset[int]]:
    """The cores each thread of ``pid`` may run on (one entry when all threads agree)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cores: set[int] = set()
                for part in line.split(":", 1)[1].strip().split(","):
                    first, _, last = part.partition("-")
                    cores.update(range(int(first), int(last or first) + 1))
                found.add(frozenset(cores))
    return found


@pytest.fixture(scope="module")
def pinned(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("pinned")
    yield from running_cluster(tiny_artifacts, base, "local", pin_cpus=True, supervise=True)


def _page_size(cluster: Cluster, user: str) -> int:
    response = StorefrontClient(cluster.gateway_address).recommend(user, timeout_s=30)
    return len(response.page.item_ids)


@CAN_PIN
def test_the_gateway_has_a_core_and_triton_the_rest(
    pinned: Cluster, tiny_artifacts: Artifacts
) -> None:
    users, _ = tiny_artifacts.users()
    assert _page_size(pinned, users[0]) == 10  # its threads exist by now
    plan = pinned.cpu_plan()
    assert plan == {"gateway": [CORES[0]], "*": CORES[1:]}
    assert _threads_cores(pinned.processes["gateway"].pid) == {frozenset(CORES[:1])}
    triton = process_tree(pinned.processes["triton"].pid)
    assert len(triton) >= 2, "Triton's python-backend stub is its child"
    for pid in triton:
        assert _threads_cores(pid) == {frozenset(CORES[1:])}


@CAN_PIN
def test_a_gateway_restarted_after_kill_9_is_pinned_again(
    pinned: Cluster, tiny_artifacts: Artifacts
) -> None:
    before = pinned.processes["gateway"].pid
    pinned.restart("gateway", kill=True)
    after = pinned.processes["gateway"].pid
    assert after != before
    users, _ = tiny_artifacts.users()
    assert _page_size(pinned, users[1]) == 10
    assert _threads_cores(after) == {frozenset(CORES[:1])}


def test_the_plan_gives_each_gateway_a_core_and_the_rest_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})

    def plan(**kw: object) -> dict[str, list[int]]:
        return Cluster(artifacts=tmp_path, stages="local", pin_cpus=True, **kw).cpu_plan()  # type: ignore[arg-type]

    assert plan() == {"gateway": [4], "*": [5, 6, 7]}
    assert plan(replicas=2) == {"gateway-1": [4], "gateway-2": [5], "*": [6, 7]}
    # more gateways than cores: they share, and everything else may use every core
    assert plan(replicas=5)["gateway-5"] == [4] and plan(replicas=5)["*"] == [4, 5, 6, 7]
    assert Cluster(artifacts=tmp_path, stages="local").cpu_plan() == {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert plan() == {}  # one core: nothing to pin


def test_pinning_is_refused_for_the_split_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one-machine layout"):
        Cluster(artifacts=tmp_path, log_dir=tmp_path, stages="grpc", pin_cpus=True).start()
