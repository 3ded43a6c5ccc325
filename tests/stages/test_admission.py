"""Admission control: refuse beyond the adaptive concurrency limit, at once, with RetryInfo."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from sluice.builds import LoadedBuilds
from sluice.client import retry_delay_s
from sluice.common.v1 import common_pb2
from sluice.core.admission import SHED_SECONDS, AdaptiveLimit, AdmissionConfig
from sluice.core.server import ServerOptions, ServiceSpec, bind
from sluice.core.stage import StageLimits, StageServicer
from sluice.domain import Budget, Candidates, RankContext
from sluice.rerank.service import BINDING
from sluice.rerank.v2 import rerank_pb2


def test_the_limit_grows_while_fast_and_saturated_and_shrinks_when_slow() -> None:
    lim = AdaptiveLimit(
        AdmissionConfig(target_ms=50, initial=4, min_limit=2, max_limit=6, window=4)
    )
    for _ in range(3):  # fast, and the limit is reached: +1 per window
        assert all(lim.try_acquire() for _ in range(int(lim.limit)))
        assert not lim.try_acquire()  # one over the limit is refused
        for _ in range(int(lim.limit)):
            lim.release(0.010)
    assert lim.limit == 6  # 4 -> 5 -> 6, then held at max_limit
    for _ in range(2):  # slow: a tenth off per window
        for _ in range(4):
            assert lim.try_acquire()
        for _ in range(4):
            lim.release(0.200)
    assert lim.limit == pytest.approx(6 * 0.9 * 0.9)
    for _ in range(40):  # a request that ran out of time is overload, whatever its latency
        assert lim.try_acquire()
        lim.release(0.001, ok=False)
    assert lim.limit == 2  # never below min_limit
    before = lim.limit
    for _ in range(8):  # quick refusals of bad input do not steer it
        assert lim.try_acquire()
        lim.release(0.0001, sample=False)
    assert lim.limit == before and lim.in_flight == 0


def test_no_growth_without_demand() -> None:
    lim = AdaptiveLimit(AdmissionConfig(target_ms=50, initial=4, window=4))
    for _ in range(5):
        assert lim.try_acquire()
        lim.release(0.001)  # one at a time: the limit of 4 is never reached
    assert lim.limit == 4


class Blocking:
    """A re-ranking engine whose requests wait for the test to let them go."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)

    def rank(self, ctx: RankContext, cands: Candidates, budget: Budget) -> Candidates:
        self.entered.release()
        assert self.go.wait(30)
        return cands


REQUEST = rerank_pb2.RankCandidatesRequest(
    candidates=common_pb2.Candidates(item_ids=[1, 2], scores=[2, 1], sources=[1, 1]),
    max_candidates=2,
)


@contextlib.contextmanager
def held_service(name: str, workers: int, limit: int) -> Iterator[tuple[Blocking, Any]]:
    """A served re-ranking stage whose requests wait in the engine until ``engine.go`` is
    set, with ``workers`` turns and an admission limit fixed at ``limit``; yields the
    engine and a call. Stopping drains it: every handler has finished afterwards."""
    engine = Blocking()
    servicer = StageServicer(BINDING, StageLimits(100, 10.0), LoadedBuilds.fixed(engine))
    config = AdmissionConfig(target_ms=1000, initial=limit, min_limit=limit, max_limit=limit)
    svc = bind(ServiceSpec(name, servicer.add_to), ServerOptions(workers=workers, admission=config))
    svc.set_serving(True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            yield (
                engine,
                ch.unary_unary(
                    BINDING.path,
                    request_serializer=rerank_pb2.RankCandidatesRequest.SerializeToString,
                    response_deserializer=rerank_pb2.RankCandidatesResponse.FromString,
                ),
            )
    finally:
        engine.go.set()
        svc.stop(5.0)


def test_beyond_the_limit_requests_are_refused_at_once_with_retry_info() -> None:
    shed = SHED_SECONDS.labels("admission-test")
    with (
        held_service("admission-test", workers=2, limit=2) as (engine, call),
        ThreadPoolExecutor(2) as pool,
    ):
        admitted = [pool.submit(call, REQUEST, timeout=30) for _ in range(2)]
        for _ in admitted:  # both are in the engine: the limit of 2 is reached
            assert engine.entered.acquire(timeout=30)
        count_before = shed._sum.get()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            call(REQUEST, timeout=30)
        refused_in = time.monotonic() - t0
        engine.go.set()
        assert [len(f.result(30).candidates.item_ids) for f in admitted] == [2, 2]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.ToMilliseconds() >= 5
    # what the project's own client reads to back off before its next attempt
    assert retry_delay_s(err.value) == retry.retry_delay.ToMilliseconds() / 1000
    assert refused_in < 5.0  # not queued behind the blocked requests (they wait 30 s)
    assert shed._sum.get() > count_before


def test_the_time_an_admitted_request_waits_for_its_turn_is_measured() -> None:
    """One handler's turn at a time: while the first request is held in the engine, a
    second waits its turn and a third runs out of time waiting. ``sluice_queue_wait_seconds``
    records both waits (the first's: none)."""

    def waited(part: str) -> float:
        labels = {"service": "queue-wait-test"}
        return REGISTRY.get_sample_value(f"sluice_queue_wait_seconds_{part}", labels) or 0.0

    short_s = 0.5
    with (
        held_service("queue-wait-test", workers=1, limit=3) as (engine, call),
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(call, REQUEST, timeout=30)
        assert engine.entered.acquire(timeout=30)  # the one turn is taken
        count, total = waited("count"), waited("sum")
        second = pool.submit(call, REQUEST, timeout=30)
        with pytest.raises(grpc.RpcError) as err:  # waits all its short deadline
            call(REQUEST, timeout=short_s)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        engine.go.set()
        assert engine.entered.acquire(timeout=30)  # the second's turn
        assert [len(f.result(30).candidates.item_ids) for f in (first, second)] == [2, 2]
    # the service has drained: every handler has recorded its wait
    assert waited("count") - count == 2
    # the second waited at least the third's deadline; generous for a slow host
    assert waited("sum") - total >= short_s
    assert not engine.entered.acquire(timeout=0)  # the third never reached the engine


def test_every_service_runs_with_admission_by_default() -> None:
    from sluice.config import GatewaySettings, RecallSettings

    gateway = GatewaySettings().server_options()
    assert gateway.admission is not None and gateway.admission.target_ms == 80
    recall = RecallSettings().server_options()
    assert recall.admission is not None and recall.workers == 4
    assert RecallSettings(admission=False).server_options().admission is None
    assert np.isfinite(recall.admission.target_ms)
