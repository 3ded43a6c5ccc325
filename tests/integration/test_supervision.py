"""kill -9 of each of the six processes under load, with the supervisor on.

A storefront client sends Recommend and Search continuously while each process in turn is
killed with SIGKILL. The supervisor restarts it (with its process group: Triton's python
backend stub must not outlive Triton). While a stage or Triton is down no request fails:
pages degrade, and recall's outage is served from the gateway's fallback. While the
gateway itself is down clients see only UNAVAILABLE. The times measured here (back to
healthy, back in use) are printed; docs/reliability.md reports them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from sluice.artifacts import Artifacts
from sluice.launch import Cluster
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.integration

STAGE_INDEX = {"recall": 0, "coarse": 1, "fine": 2, "rerank": 3, "triton": 2}
RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


@pytest.fixture(scope="module")
def supervised(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from running_cluster(
        tiny_artifacts, tmp_path_factory.mktemp("supervised"), supervise=True
    )


@dataclass
class Load:
    """A client sending requests back to back (20 a second at most) until stopped."""

    address: str
    users: list[str]
    phase: str = "warm-up"
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Condition = field(default_factory=threading.Condition)

    started: str = ""

    def enter(self, phase: str) -> None:
        """Switch to ``phase`` once a request has started in it: requests go one at a time,
        so none of the previous phase is in flight any more. Each request counts in the phase
        it started in."""
        with self.done:
            self.phase = phase
            assert self.done.wait_for(lambda: self.started == phase, timeout=30)

    def run(self) -> None:
        channel = grpc.insecure_channel(self.address, options=RECONNECT)
        stub = storefront_pb2_grpc.StorefrontServiceStub(channel)
        i = 0
        while not self.stop.is_set():
            with self.done:
                phase, i = self.phase, i + 1
                self.started = phase
                self.done.notify_all()
            try:
                if i % 2:
                    req = storefront_pb2.RecommendRequest(
                        user_id=self.users[i % len(self.users)], page_size=5
                    )
                    resp = stub.Recommend(req, timeout=2)
                else:
                    resp = stub.Search(
                        storefront_pb2.SearchRequest(query="shoes", page_size=5), timeout=2
                    )
                outcome = "degraded" if any(s.degraded for s in resp.stages) else "ok"
            except grpc.RpcError as err:
                outcome = err.code().name
            with self.done:
                self.outcomes.setdefault(phase, Counter())[outcome] += 1
            self.stop.wait(0.05)  # pacing, not synchronisation
        channel.close()


def _in_use_again(c: Cluster, name: str, timeout_s: float = 10.0) -> float:
    """Seconds until a request comes back with the restarted stage not degraded."""
    channel = grpc.insecure_channel(c.gateway_address)
    stub = storefront_pb2_grpc.StorefrontServiceStub(channel)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout_s:
            resp = stub.Recommend(
                storefront_pb2.RecommendRequest(user_id="x", page_size=3), timeout=2
            )
            if not resp.stages[STAGE_INDEX[name]].degraded:
                return time.monotonic() - t0
        raise AssertionError(f"the gateway did not use {name} again within {timeout_s} s")
    finally:
        channel.close()


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (Linux /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            live.append(int(stat.parent.name))
    return live


def test_kill_9_of_each_process_under_load(supervised: Cluster, tiny_artifacts: Artifacts) -> None:
    users, _ = tiny_artifacts.users()
    load = Load(supervised.gateway_address, list(users[:50]))
    worker = threading.Thread(target=load.run)
    worker.start()
    load.enter("warm-up")
    timings: dict[str, tuple[float, float]] = {}
    try:
        for name in ("recall", "coarse", "fine", "rerank", "triton", "gateway"):
            victim = supervised.processes[name]
            restarted = supervised.restarts.get(name, 0)
            load.enter(name)
            killed = time.monotonic()
            victim.kill()
            # this kill's restart, whatever happened before it
            supervised.wait_restarted(name, restarted + 1, timeout_s=60)
            supervised.wait_serving(name, timeout_s=120)
            back = time.monotonic() - killed
            # its whole group went with it (killed children linger as zombies until init
            # reaps them, which is not the supervisor's doing)
            assert live_group_members(victim.pid) == []
            in_use = 0.0 if name == "gateway" else _in_use_again(supervised, name)
            timings[name] = (back, in_use)
            load.enter(f"after {name}")
    finally:
        load.stop.set()
        worker.join()
    print("\nprocess: back to healthy (s), then in use again (s)")
    for name, (back, in_use) in timings.items():
        print(
            f"  {name:8} {back:5.1f}  {in_use:5.2f}   outcomes {dict(load.outcomes.get(name, {}))}"
        )
    for phase, outcomes in load.outcomes.items():
        failed = {k: v for k, v in outcomes.items() if k not in ("ok", "degraded")}
        if phase == "gateway":
            assert set(failed) <= {"UNAVAILABLE"}, f"{phase}: {dict(outcomes)}"
        else:
            assert not failed, f"requests failed while {phase} was down: {dict(outcomes)}"
    assert sum(load.outcomes.get("recall", Counter()).values()) > 0, "no load while recall was down"
