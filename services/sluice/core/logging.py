"""Structured JSON logs carrying the request id, the stage and (when traced) the trace id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_stage = "-"

REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def current_request_id() -> str:
    return request_id_var.get()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that propagates the current request id to a downstream call."""
    rid = request_id_var.get()
    return ((REQUEST_ID_HEADER, rid),) if rid else ()


class JsonFormatter(logging.Formatter):
    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "stage": _stage,
            "request_id": request_id_var.get() or None,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:  # the line joins its trace in the tracing backend
            payload["trace_id"] = trace.format_trace_id(span.trace_id)
            payload["span_id"] = trace.format_span_id(span.span_id)
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure(stage: str, level: str = "INFO") -> None:
    """Route every log record of this process to stderr as one JSON line."""
    global _stage
    _stage = stage
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
