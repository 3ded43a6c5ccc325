"""Zero-downtime swaps: a build published while the cascade serves goes live without a
restart, no request fails, and no page mixes two builds.

A build store holds build A (published) and build B (same shop, different models). The
cluster serves A under a steady load of storefront calls from stubs that set no deadline.
Then B's ranker version is renamed into Triton's model repository (the last step of
`sluice build`, replayed: Triton, polling the repository, loads it beside A's) and B is
published. Every service loads B in the background; the gateway switches once every
stage has it. Both layouts are checked: the split services and the one-machine gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from sluice.artifacts import Artifacts
from sluice.builds import publish
from sluice.launch import Cluster, Ports
from tests.integration.storefront_load import HeldBuild, Load, Store, assert_swapped_cleanly

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store.of(tiny_artifacts, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def held(store: Store) -> HeldBuild:
    return HeldBuild.make(store)


@pytest.fixture(params=["grpc", "local"])
def cluster(
    request: pytest.FixtureRequest, store: Store, held: HeldBuild, tmp_path: Path
) -> Iterator[Cluster]:
    held.hold()  # a previous layout's run released it: Triton starts without it
    publish(store.root, store.first)
    c = Cluster(
        artifacts=store.root,
        ports=Ports.random(),
        log_dir=tmp_path / "logs",
        event_log_dir=tmp_path / "events",
        stages=request.param,
    )
    c.start(timeout_s=240)
    yield c
    c.stop()


def test_a_published_build_swaps_in_under_load_without_errors_or_mixing(
    cluster: Cluster, store: Store, held: HeldBuild, tiny_artifacts: Artifacts
) -> None:
    users, _ = tiny_artifacts.users()
    with Load(cluster.gateway_address, users[:50], rate=15.0, threads=3) as load:
        load.wait_for_build(store.first, 20, timeout_s=60)
        held.release()  # Triton loads it beside A's
        publish(store.root, held.build_id)
        load.wait_for_build(held.build_id, 40)
    assert_swapped_cleanly(load.answers, store.first, held.build_id)
    assert cluster.health("gateway") == health_pb2.HealthCheckResponse.SERVING
