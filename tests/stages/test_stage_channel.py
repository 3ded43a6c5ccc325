"""The gateway's channel to a stage keeps one health watch open, so that its calls start no
thread each (``sluice.gateway.stages.SpinKeeper``), and opens it again after the stage
restarts. Real stage services over gRPC."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from sluice.builds import LoadedBuilds
from sluice.core.server import RunningService, ServerOptions, ServiceSpec, bind
from sluice.core.stage import StageLimits, StageServicer
from sluice.domain import Budget, Candidates, RankContext
from sluice.gateway.stages import GrpcStage
from sluice.rerank.service import BINDING


class Identity:
    """A re-ranking engine that keeps the order."""

    def rank(self, ctx: RankContext, cands: Candidates, budget: Budget) -> Candidates:
        return cands


def serve(port: int = 0) -> RunningService:
    servicer = StageServicer(BINDING, StageLimits(100, 10.0), LoadedBuilds.fixed(Identity()))
    # one handler thread: an open watch that held one would starve every call
    svc = bind(ServiceSpec("keeper-test", servicer.add_to), ServerOptions(port=port, workers=1))
    svc.set_serving(True)
    return svc


CANDS = Candidates(np.array([1, 2]), np.array([2.0, 1.0]), np.array([1, 1]))


def threads_started_by(stage: GrpcStage, calls: int, monkeypatch: pytest.MonkeyPatch) -> int:
    started = 0
    real_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        nonlocal started
        started += 1
        real_start(self)

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", counting_start)
        for _ in range(calls):
            result = stage.call(RankContext(), CANDS, Budget.within(2, 10.0))
            assert result.candidates.item_ids.tolist() == [1, 2]
    return started


def wait_opened(stage: GrpcStage, count: int) -> None:
    """Until the stage's keeper has opened ``count`` watches (it opens them on its thread)."""
    deadline = time.monotonic() + 30
    while stage._keeper.opened < count and time.monotonic() < deadline:
        time.sleep(0.02)  # polling a counter, with a deadline
    assert stage._keeper.opened >= count


@pytest.fixture
def service() -> Iterator[RunningService]:
    svc = serve()
    yield svc
    svc.stop(0.5)


def test_stage_calls_start_no_thread_while_the_watch_is_open(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = GrpcStage(BINDING, f"127.0.0.1:{service.port}")
    try:
        wait_opened(stage, 1)
        threads_started_by(stage, 1, monkeypatch)  # the channel's first call
        assert threads_started_by(stage, 20, monkeypatch) == 0
    finally:
        stage.close()
    # without the watch, every call on an idle channel starts the channel's thread again:
    # what this guards against
    stage = GrpcStage(BINDING, f"127.0.0.1:{service.port}")
    stage._keeper.close()
    try:
        threads_started_by(stage, 1, monkeypatch)
        assert threads_started_by(stage, 20, monkeypatch) >= 10
    finally:
        stage.close()


def test_the_watch_is_opened_again_after_the_stage_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = serve()
    port = first.port
    stage = GrpcStage(BINDING, f"127.0.0.1:{port}")
    second: RunningService | None = None
    try:
        wait_opened(stage, 1)
        threads_started_by(stage, 1, monkeypatch)
        first.stop(0)  # the stage goes away: its watch ends
        second = serve(port)  # and comes back on the same address
        wait_opened(stage, 2)
        threads_started_by(stage, 1, monkeypatch)  # the channel reconnects
        assert threads_started_by(stage, 20, monkeypatch) == 0
    finally:
        stage.close()
        first.stop(0)
        if second is not None:
            second.stop(0)
