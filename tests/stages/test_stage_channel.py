"""The gateway's channel to a stage keeps one health watch open, so that its calls start no
thread each (``sluice.gateway.stages.SpinKeeper``), and opens it again after the stage
restarts; it reaches a stage whose connections are slow to set up. Real stage services over
gRPC."""

from __future__ import annotations

import contextlib
import socket
import socketserver
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


class SlowHandshakeProxy(socketserver.ThreadingTCPServer):
    """Forwards TCP to ``upstream``, holding back the server's first bytes of each connection
    (its HTTP/2 SETTINGS) for ``delay_s``: a stage on a loaded host, or behind a slow TLS
    handshake, as the gateway's channel sees it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream, self.delay_s = upstream, delay_s
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Forward(socketserver.BaseRequestHandler):
    server: SlowHandshakeProxy

    def handle(self) -> None:
        with socket.create_connection(self.server.upstream) as upstream:
            to_server = threading.Thread(target=_pump, args=(self.request, upstream, 0.0))
            to_server.start()
            _pump(upstream, self.request, self.server.delay_s)
            to_server.join()


def _pump(source: socket.socket, sink: socket.socket, first_delay_s: float) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            if first_delay_s:
                time.sleep(first_delay_s)  # the fault: the first bytes arrive late
                first_delay_s = 0.0
            sink.sendall(chunk)
    for s in (source, sink):  # the other direction ends too
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def test_a_stage_whose_connections_set_up_slowly_is_still_reached(
    service: RunningService,
) -> None:
    """gRPC core reads ``grpc.min_reconnect_backoff_ms`` as the least time a connection
    attempt gets. At 100 ms, a stage that took 400 ms to answer the handshake was never
    reached: every attempt timed out before the SETTINGS frame, and every call failed with
    UNAVAILABLE. The calls must get through, the first one waiting for the connection."""
    proxy = SlowHandshakeProxy(("127.0.0.1", service.port), delay_s=0.4)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    stage = GrpcStage(BINDING, proxy.address)
    try:
        for _ in range(3):
            result = stage.call(RankContext(), CANDS, Budget.within(2, 10.0))
            assert result.candidates.item_ids.tolist() == [1, 2]
    finally:
        stage.close()
        proxy.shutdown()
        proxy.server_close()
