"""The standard gRPC health service (``grpc.health.v1.Health``) every Sluice server runs.

Why not ``grpc_health.v1.health.HealthServicer``: with ``experimental_non_blocking`` (which
keeps an open ``Watch`` from holding a handler thread) it sends each watcher's update while
holding its lock, and a send waits until the server's one completion-queue thread has
completed it. That same thread runs a closing ``Watch``'s clean-up callback, which takes
the lock. A status change that meets a watch closing at that moment stops both threads
for good: ``set`` never returns, ``Check`` blocks on the lock, and the service never
reports SERVING (grpc/grpc#43403; found as a recall shard that never became SERVING in
CI while the recall front's watches on it came and went).

This one keeps the state lock only to read or change state, never while sending. Sends
take a second lock, which the clean-up callback never takes, so that a watcher gets its
first status and every change in order. It also decodes its own requests: the health
service bypasses the bootstrap's interceptor (it must answer under overload and without an
API key), and grpcio would answer bytes that are not a ``HealthCheckRequest`` with INTERNAL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from sluice.core.errors import decode_or_abort

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

Send = Callable[[health_pb2.HealthCheckResponse | None], Any]
"""How a non-blocking server-streaming handler sends a message (None ends the call)."""


class HealthServicer:
    """``Check`` and ``Watch`` over named statuses; ``""`` is the whole server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # statuses and watchers; never held while sending
        self._send_lock = threading.Lock()  # one sender at a time: updates arrive in order
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[Send]] = {}

    def Check(  # noqa: N802 (the gRPC method's name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(  # noqa: N802 (the gRPC method's name)
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Send | None = None,
    ) -> None:
        if send_response_callback is None:
            raise RuntimeError("Watch needs a server that runs it non-blocking")
        send, service = send_response_callback, request.service
        with self._send_lock:
            with self._lock:
                status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                self._watchers.setdefault(service, set()).add(send)
            if not context.add_callback(lambda: self._forget(service, send)):
                self._forget(service, send)  # the call ended already
                return
            send(health_pb2.HealthCheckResponse(status=status))

    def add_to(self, server: grpc.Server) -> None:
        """Serve ``grpc.health.v1.Health`` on ``server``, decoding its requests here."""
        respond = health_pb2.HealthCheckResponse.SerializeToString
        handlers = {
            "Check": grpc.unary_unary_rpc_method_handler(
                self._check_bytes, response_serializer=respond
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self._watch_bytes, response_serializer=respond
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )

    def _check_bytes(
        self, raw: bytes, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return self.Check(_decoded(raw, context), context)

    def _watch_bytes(
        self, raw: bytes, context: grpc.ServicerContext, send_response_callback: Send | None = None
    ) -> None:
        self.Watch(_decoded(raw, context), context, send_response_callback)

    # run by gRPC without a handler thread of its own (see the module's docstring)
    _watch_bytes.experimental_non_blocking = True  # type: ignore[attr-defined]

    def _forget(self, service: str, send: Send) -> None:
        """A watch ended: runs on the server's completion-queue thread, so it never sends."""
        with self._lock:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(send)
                if not watchers:
                    del self._watchers[service]

    def set(self, service: str, status: int) -> None:
        """Set a status; each open watch of ``service`` gets it if it changed."""
        with self._send_lock:
            with self._lock:
                if self._status.get(service) == status:
                    return
                self._status[service] = status
                watchers = list(self._watchers.get(service, ()))
            response = health_pb2.HealthCheckResponse(status=status)
            for send in watchers:
                send(response)  # False, no error, when that call has ended meanwhile


def _decoded(raw: bytes, context: grpc.ServicerContext) -> health_pb2.HealthCheckRequest:
    """The request, or INVALID_ARGUMENT with the bootstrap's details (ErrorInfo, BadRequest)."""
    request = decode_or_abort(health_pb2.HealthCheckRequest.FromString, raw, context)
    assert isinstance(request, health_pb2.HealthCheckRequest)
    return request
