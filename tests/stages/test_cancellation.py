"""A caller that goes away stops the work it started, down the cascade."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import REGISTRY

from sluice.builds import LoadedBuilds
from sluice.core.admission import AdmissionConfig
from sluice.core.errors import Cancelled
from sluice.core.server import ServerOptions, ServiceSpec, bind
from sluice.core.stage import StageLimits, StageServicer
from sluice.domain import Budget, Cancellation, Candidates, RankContext
from sluice.gateway.stages import GrpcStage
from sluice.rerank.service import BINDING
from tests.redis_fixture import wait_until
from tests.stages.test_admission import Blocking


def _waiting(service: str) -> float:
    """Requests the service holds waiting for a turn (``sluice_queue_waiting_requests``)."""
    labels = {"service": service}
    return REGISTRY.get_sample_value("sluice_queue_waiting_requests", labels) or 0.0


def test_cancelling_reaches_the_stage_call_in_flight_and_the_one_waiting() -> None:
    engine = Blocking()
    servicer = StageServicer(BINDING, StageLimits(100, 30.0), LoadedBuilds.fixed(engine))
    options = ServerOptions(workers=1, admission=AdmissionConfig(initial=4, max_limit=4))
    svc = bind(ServiceSpec("cancel-test", servicer.add_to), options)
    svc.set_serving(True)
    stage = GrpcStage(BINDING, f"127.0.0.1:{svc.port}")
    cands = Candidates(np.array([1, 2]), np.array([2.0, 1.0]), np.array([1, 1]))
    first, second = Cancellation(), Cancellation()
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(stage.call, RankContext(), cands, Budget(2, None, 0, first))
            assert engine.entered.acquire(timeout=30)  # the first is in the engine
            waiting = pool.submit(stage.call, RankContext(), cands, Budget(2, None, 0, second))
            wait_until(lambda: _waiting("cancel-test") == 1, "the second waits its turn")
            second.cancel()  # its caller goes away while it waits for the one worker
            with pytest.raises(Cancelled):
                waiting.result(timeout=30)
            # the server lets it go at once, while the first still holds the one turn
            wait_until(lambda: _waiting("cancel-test") == 0, "the cancelled one left its place")
            first.cancel()  # and the first one's caller too, mid-work
            with pytest.raises(Cancelled):
                running.result(timeout=30)
            engine.go.set()
        svc.stop(10)  # returns once every handler, the waiter's included, has finished
        # the engine ran once: the cancelled waiter never started
        assert not engine.entered.acquire(blocking=False)
    finally:
        engine.go.set()
        stage.close()
        svc.stop(0.5)


def test_a_cancellation_runs_hooks_once_and_late_hooks_at_once() -> None:
    c = Cancellation()
    calls: list[str] = []
    c.on_cancel(lambda: calls.append("a"))
    hook = lambda: calls.append("b")  # noqa: E731
    c.on_cancel(hook)
    c.forget(hook)
    c.cancel()
    c.cancel()
    c.on_cancel(lambda: calls.append("late"))
    assert calls == ["a", "late"] and c.cancelled
