"""Domain errors and their mapping to gRPC statuses.

Domain code raises these plain exceptions; the error-mapping interceptor in
:mod:`sluice.core.server` turns them into ``google.rpc.Status`` with
``ErrorInfo`` and, for bad input, ``BadRequest`` field violations. Anything
else that escapes a handler is a bug and becomes INTERNAL (and is logged).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "sluice.dev"


@dataclass
class SluiceError(Exception):
    """Base of every error that has a defined gRPC status."""

    message: str
    reason: str = "SLUICE_ERROR"
    metadata: dict[str, str] = field(default_factory=dict)

    code = grpc.StatusCode.INTERNAL

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def details(self) -> list[Message]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        return [info]

    def to_status(self) -> status_pb2.Status:
        packed = []
        for detail in self.details():
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=packed
        )


@dataclass
class InvalidArgument(SluiceError):
    """A request field is missing, malformed or out of range."""

    field_path: str = ""
    reason: str = "INVALID_ARGUMENT"
    code = grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> list[Message]:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=self.field_path, description=self.message
        )
        return [*super().details(), error_details_pb2.BadRequest(field_violations=[violation])]


@dataclass
class NotFound(SluiceError):
    """A named resource (item, model version) does not exist."""

    reason: str = "NOT_FOUND"
    code = grpc.StatusCode.NOT_FOUND


@dataclass
class Unavailable(SluiceError):
    """A dependency is down or the service is not ready; retry later."""

    reason: str = "UNAVAILABLE"
    code = grpc.StatusCode.UNAVAILABLE


@dataclass
class DeadlineExceeded(SluiceError):
    """Too little of the caller's deadline is left to do the work."""

    reason: str = "DEADLINE_EXCEEDED"
    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass
class Unauthenticated(SluiceError):
    """The call carries no valid credentials."""

    reason: str = "UNAUTHENTICATED"
    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass
class PermissionDenied(SluiceError):
    """The caller is known but may not call this."""

    reason: str = "PERMISSION_DENIED"
    code = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class FailedPrecondition(SluiceError):
    """The system is not in a state that allows this call (it will not pass on retry)."""

    reason: str = "FAILED_PRECONDITION"
    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Cancelled(SluiceError):
    """The caller went away (cancelled the call or its deadline passed); the work stops."""

    reason: str = "CANCELLED"
    code = grpc.StatusCode.CANCELLED


@dataclass
class DeadlineTooShort(DeadlineExceeded):
    """The caller's deadline is too short to start: its choice, not a sign of overload."""

    reason: str = "DEADLINE_TOO_SHORT"


@dataclass
class ResourceExhausted(SluiceError):
    """The service is overloaded; retry after ``retry_delay_ms``."""

    retry_delay_ms: int = 100
    reason: str = "OVERLOADED"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> list[Message]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_delay_ms)
        return [*super().details(), error_details_pb2.RetryInfo(retry_delay=delay)]


def from_rpc_error(err: grpc.RpcError, dependency: str) -> SluiceError:
    """Translate a failed downstream call into the error to return upstream.

    Bad input found downstream is still the caller's bad input; a dependency
    that is down or slow makes this service UNAVAILABLE or out of time.
    """
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    detail = err.details() if isinstance(err, grpc.Call) else str(err)
    meta = {"dependency": dependency}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # the caller built that request: a dependency refusing it is this service's problem
        # (settings that disagree, a limit it did not check), not its own caller's bad input
        return Unavailable(f"{dependency} refused the request: {detail}", metadata=meta)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(str(detail), metadata=meta)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{dependency} ran out of time: {detail}", metadata=meta)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"{dependency} is overloaded: {detail}", metadata=meta)
    return Unavailable(f"{dependency} failed ({code.name}): {detail}", metadata=meta)


def decode_request(deserialize: Callable[[bytes], Message], raw: bytes) -> Message:
    """``raw`` decoded with ``deserialize`` (a message class's ``FromString``); bytes that are
    not that message, or hold invalid UTF-8 in a string field, are InvalidArgument: the
    caller's fault, where grpcio's own decoding would answer INTERNAL."""
    try:
        return deserialize(raw)
    except Exception as err:  # DecodeError, UnicodeDecodeError, RuntimeWarning, ...
        owner = getattr(deserialize, "__self__", None)
        name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")
        raise InvalidArgument(
            f"the request body is not a valid {name} message "
            "(or holds invalid UTF-8 in a string field)",
            reason="UNDECODABLE_REQUEST",
        ) from err


def decode_or_abort(
    deserialize: Callable[[bytes], Message], raw: bytes, context: grpc.ServicerContext
) -> Message:
    """:func:`decode_request` for a handler the interceptor does not wrap (health,
    reflection): bytes that are not the message end the call with INVALID_ARGUMENT and
    the interceptor's details (``ErrorInfo``, ``BadRequest``)."""
    try:
        return decode_request(deserialize, raw)
    except InvalidArgument as err:
        context.abort_with_status(rpc_status.to_status(err.to_status()))
        raise  # abort_with_status raised already
