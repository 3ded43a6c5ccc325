"""Admission control: an adaptive concurrency limit per method, AIMD on a latency target, in
the manner of the AIMD limit of Netflix's concurrency-limits.

Every service runs more handler threads than it lets work at once: a request that finds
``limit`` others in flight is refused at once with RESOURCE_EXHAUSTED and a RetryInfo, so
the admitted ones keep their latency instead of all of them queueing past their deadline.
The limit follows the latency of the admitted requests: after every few of them, if their
average latency is above the target (or one failed for lack of time) the limit is cut by a
tenth; if it is below and the limit was reached meanwhile, it grows by one. It settles
where the latency meets the target.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import Gauge, Histogram

from sluice.core.errors import ResourceExhausted

LIMIT = Gauge("sluice_admission_limit", "Current concurrency limit", ["service", "methods"])
SHED_SECONDS = Histogram(
    "sluice_admission_shed_seconds",
    "Server time spent on a request that admission control refused",
    ["service"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025),
)


@dataclass(frozen=True)
class AdmissionConfig:
    """How a method's concurrency limit moves."""

    target_ms: float = 100.0
    """Average latency of admitted requests the limit steers to."""
    initial: int = 8
    min_limit: int = 1
    max_limit: int = 64
    window: int = 10
    """Admitted requests per limit update."""
    backoff: float = 0.9


class AdaptiveLimit:
    """One method's limit and its in-flight count (thread-safe)."""

    def __init__(self, config: AdmissionConfig, labels: tuple[str, str] = ("", "")) -> None:
        self.config = config
        self.limit = float(config.initial)
        self.in_flight = 0
        self._lock = threading.Lock()
        self._latency_sum = 0.0
        self._count = 0
        self._saturated = False
        self._overloaded = False
        self._gauge = LIMIT.labels(*labels)
        self._gauge.set(self.limit)

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= int(self.limit):
                self._saturated = True
                return False
            self.in_flight += 1
            if self.in_flight >= int(self.limit):
                self._saturated = True
            return True

    def release(self, latency_s: float, sample: bool = True, ok: bool = True) -> None:
        """An admitted request ended. ``sample``: its latency tells about the load (a served
        request, not a quick refusal of bad input); ``ok`` False (it ran out of time) counts
        as overload."""
        with self._lock:
            self.in_flight -= 1
            if not sample:
                return
            self._latency_sum += latency_s
            self._count += 1
            self._overloaded |= not ok
            if self._count < self.config.window:
                return
            average_ms = 1000 * self._latency_sum / self._count
            if self._overloaded or average_ms > self.config.target_ms:
                value = self.limit * self.config.backoff
            elif self._saturated:
                value = self.limit + 1
            else:
                value = self.limit
            self.limit = max(float(self.config.min_limit), min(float(self.config.max_limit), value))
            self._gauge.set(self.limit)
            self._latency_sum, self._count = 0.0, 0
            self._saturated = self._overloaded = False

    def retry_delay_ms(self) -> int:
        """About one target latency: by then an admitted request has usually finished."""
        return int(min(1000, max(5, self.config.target_ms)))


class Admission:
    """A service's concurrency limit (one for the methods it governs: they share the CPU)."""

    def __init__(self, service: str, config: AdmissionConfig) -> None:
        self.service = service
        self.config = config
        self.limit = AdaptiveLimit(config, (service, "all"))

    def refuse(self, started: float) -> ResourceExhausted:
        """The error for a refused request (and its server time, for the shed histogram)."""
        SHED_SECONDS.labels(self.service).observe(time.perf_counter() - started)
        return ResourceExhausted(
            f"{self.service} is at its concurrency limit ({int(self.limit.limit)} in flight); "
            "retry after the delay",
            retry_delay_ms=self.limit.retry_delay_ms(),
            reason="CONCURRENCY_LIMIT",
        )
