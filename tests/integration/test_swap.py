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

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from sluice.artifacts import MANIFEST, Artifacts
from sluice.builds import BUILDS, build_id_of, new_build_id, publish
from sluice.launch import Cluster, Ports
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.conftest import tiny_build

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Store:
    root: Path
    old: str
    new: str
    staged_ranker: Path
    """B's ranker version, held back from Triton until the swap."""
    ranker_target: Path


@pytest.fixture(scope="module")
def store(tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Store:
    from sluice.build.pipeline import build

    root = tmp_path_factory.mktemp("store")
    repository = root / "model_repository"
    shutil.copytree(tiny_artifacts.model_repository, repository)
    old = build_id_of(tiny_artifacts.root)
    a = root / BUILDS / old
    shutil.copytree(tiny_artifacts.root, a)
    manifest = json.loads((a / MANIFEST).read_text())
    manifest["fine_ranker"]["repository"] = str(repository)
    (a / MANIFEST).write_text(json.dumps(manifest))
    publish(root, old)

    new = new_build_id()
    b = build(tiny_build(root / BUILDS / new, repository, build_id=new, seed=11, epochs=4))
    staged = root / "staged-ranker"
    b.ranker_dir.rename(staged)
    return Store(root, old, new, staged, b.ranker_dir)


@dataclass
class Answer:
    started: float
    ended: float
    code: grpc.StatusCode
    build_id: str = ""
    stage_builds: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)


class Load:
    """Storefront calls in a loop from a few threads, each answer recorded."""

    def __init__(self, address: str, users: list[str], threads: int = 3) -> None:
        self.answers: list[Answer] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._stub = storefront_pb2_grpc.StorefrontServiceStub(self._channel)
        self._threads = [
            threading.Thread(target=self._run, args=(i, users), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self._channel.close()

    def _run(self, worker: int, users: list[str]) -> None:
        n = worker
        while not self._stop.is_set():
            n += 1
            user = users[n % len(users)]
            started = time.monotonic()
            try:  # no deadline: the gateway's default budget applies
                if n % 2:
                    resp = self._stub.Search(
                        storefront_pb2.SearchRequest(query="shoes", user_id=user, page_size=10)
                    )
                else:
                    resp = self._stub.Recommend(
                        storefront_pb2.RecommendRequest(user_id=user, page_size=10)
                    )
                answer = Answer(
                    started,
                    time.monotonic(),
                    grpc.StatusCode.OK,
                    resp.build_id,
                    [s.build_id for s in resp.stages if not s.degraded],
                    [s.degraded_reason for s in resp.stages if s.degraded],
                )
            except grpc.RpcError as err:
                answer = Answer(started, time.monotonic(), err.code())
            with self.changed:
                self.answers.append(answer)
                self.changed.notify_all()

    def wait_for(self, build_id: str, count: int, timeout_s: float) -> None:
        """Until ``count`` answers came from ``build_id``."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: sum(a.build_id == build_id for a in self.answers) >= count, timeout_s
            )
        assert ok, f"fewer than {count} answers from {build_id} within {timeout_s} s"


@pytest.fixture(params=["grpc", "local"])
def cluster(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> Iterator[Cluster]:
    if store.ranker_target.exists():  # a previous layout's run swapped it in: hold it back
        store.ranker_target.rename(store.staged_ranker)
    publish(store.root, store.old)
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
    cluster: Cluster, store: Store, tiny_artifacts: Artifacts
) -> None:
    users, _ = tiny_artifacts.users()
    with Load(cluster.gateway_address, users[:50]) as load:
        load.wait_for(store.old, 20, timeout_s=60)
        store.staged_ranker.rename(store.ranker_target)  # Triton loads it beside A's
        publish(store.root, store.new)
        load.wait_for(store.new, 40, timeout_s=180)
    answers = load.answers

    failed = [a.code for a in answers if a.code is not grpc.StatusCode.OK]
    assert not failed, f"{len(failed)} of {len(answers)} calls failed: {set(failed)}"
    assert {a.build_id for a in answers} == {store.old, store.new}
    # every stage that answered names its build (the degraded ones did not answer)
    assert all(len(a.stage_builds) + len(a.degraded) == 4 for a in answers)
    assert sum(len(a.stage_builds) for a in answers) >= 3 * len(answers)
    mixed = [a for a in answers if any(b != a.build_id for b in a.stage_builds)]
    assert not mixed, f"{len(mixed)} pages mixed builds, e.g. {mixed[0]}"
    assert not [r for a in answers for r in a.degraded if "build" in r]
    # once the gateway answered from B, every call that started later is B's
    first_new = min(a.ended for a in answers if a.build_id == store.new)
    late_old = [a for a in answers if a.started > first_new and a.build_id == store.old]
    assert not late_old, f"{len(late_old)} calls went to the old build after the swap"
    assert cluster.health("gateway") == health_pb2.HealthCheckResponse.SERVING
