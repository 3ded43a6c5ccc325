"""The health service every server runs (``sluice.core.health``).

The stock non-blocking servicer of grpcio-health-checking stops for good when a status
change meets a closing watch (grpc/grpc#43403): its send waits for the server's
completion-queue thread while holding the lock that thread needs to clean up the closing
watch. These tests pin that ordering down, then drive a real server with watches that
open and close while statuses change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from sluice.core.health import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Call:
    """What a server gives a non-blocking Watch handler: callbacks run when the call ends."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


def _request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def test_a_watch_ends_while_an_update_is_being_sent() -> None:
    """As in gRPC: a send completes only once the completion-queue thread is free, and that
    thread may first have to clean up another watch that ended. The clean-up must not wait
    for the send."""
    servicer = HealthServicer()
    ending = Call()
    servicer.Watch(_request("x"), ending, lambda response: True)
    cleaned_up_in_time: list[bool] = []

    def send(response: health_pb2.HealthCheckResponse | None) -> bool:
        if response is not None and response.status == NOT_SERVING:
            queue_thread = threading.Thread(target=ending.end)
            queue_thread.start()
            queue_thread.join(timeout=5)
            cleaned_up_in_time.append(not queue_thread.is_alive())
        return True

    servicer.Watch(_request("x"), Call(), send)
    setter = threading.Thread(target=servicer.set, args=("x", NOT_SERVING))
    setter.start()
    setter.join(timeout=15)
    assert not setter.is_alive()
    assert cleaned_up_in_time == [True]


def test_an_ended_watch_is_sent_nothing_more() -> None:
    servicer = HealthServicer()
    call, seen = Call(), list[health_pb2.HealthCheckResponse | None]()
    servicer.Watch(_request("x"), call, seen.append)
    servicer.set("x", SERVING)
    call.end()
    servicer.set("x", NOT_SERVING)
    assert seen == [health_pb2.HealthCheckResponse(status=s) for s in (SERVICE_UNKNOWN, SERVING)]


@pytest.fixture
def served() -> Iterator[tuple[HealthServicer, str]]:
    servicer = HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_check_answers_set_statuses_and_not_found(served: tuple[HealthServicer, str]) -> None:
    servicer, address = served
    servicer.set("sluice.x.v1.XService", NOT_SERVING)
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(_request(""), timeout=5).status == SERVING
        assert check(_request("sluice.x.v1.XService"), timeout=5).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            check(_request("nothing.here"), timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_watch_gets_the_status_then_each_change_once(
    served: tuple[HealthServicer, str],
) -> None:
    servicer, address = served
    with grpc.insecure_channel(address) as channel:
        updates: Any = health_pb2_grpc.HealthStub(channel).Watch(_request("x"), timeout=10)
        assert next(updates).status == SERVICE_UNKNOWN
        for status in (SERVING, SERVING, NOT_SERVING, NOT_SERVING, SERVING):
            servicer.set("x", status)
        assert [next(updates).status for _ in range(3)] == [SERVING, NOT_SERVING, SERVING]
        servicer.set("y", NOT_SERVING)  # another name: not this watch's business
        servicer.set("x", NOT_SERVING)
        assert next(updates).status == NOT_SERVING
        updates.cancel()


def test_statuses_change_while_watches_come_and_go(served: tuple[HealthServicer, str]) -> None:
    """What hung the stock servicer: a recall front's watches on a shard open and close
    while the shard turns SERVING. Every change is made, and the server still answers."""
    servicer, address = served
    stop = threading.Event()
    opened = [0] * 3

    def churn(k: int) -> None:
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch
            while not stop.is_set():
                calls = [watch(_request("x"), timeout=10) for _ in range(8)]
                for call in calls:
                    next(call)
                for call in calls:
                    call.cancel()
                opened[k] += len(calls)

    churners = [threading.Thread(target=churn, args=(k,), daemon=True) for k in range(3)]
    for thread in churners:
        thread.start()

    def toggle() -> None:  # at least 3000 changes, while each client opens 40 watches
        i = 0
        while i < 3000 or min(opened) < 40:
            servicer.set("x", NOT_SERVING if i % 2 else SERVING)
            i += 1
        servicer.set("x", SERVING)

    setter = threading.Thread(target=toggle, daemon=True)
    setter.start()
    setter.join(timeout=120)
    stop.set()
    for thread in churners:
        thread.join(timeout=30)
    assert not setter.is_alive(), "a status change never completed"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(_request("x"), timeout=5).status == SERVING  # the last change
        updates: Any = stub.Watch(_request("x"), timeout=10)
        assert next(updates).status == SERVING
        updates.cancel()


@pytest.mark.parametrize("method", ["Check", "Watch"])
@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a" + b"\x80" * 12, b"\x0a\x02\xc3\x28"],
    ids=["garbage", "truncated", "bad-varint", "bad-utf8"],
)
def test_bytes_that_are_not_a_request_get_invalid_argument(
    served: tuple[HealthServicer, str], method: str, body: bytes
) -> None:
    """A client we did not write sends raw bytes: INVALID_ARGUMENT with the bootstrap's
    details, not grpcio's INTERNAL, and the service goes on answering."""
    _, address = served
    with grpc.insecure_channel(address) as channel:
        path = f"/grpc.health.v1.Health/{method}"

        def call() -> object:
            if method == "Check":
                return channel.unary_unary(path)(body, timeout=5)
            return next(iter(channel.unary_stream(path)(body, timeout=5)))

        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(err.value)
        assert status is not None
        kinds = {d.type_url.rsplit("/", 1)[1] for d in status.details}
        assert kinds == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(_request(""), timeout=5).status == SERVING
