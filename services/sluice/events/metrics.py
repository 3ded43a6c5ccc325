"""The event path's counters (``EventLog``, ``Ingestor``) as Prometheus metrics.

Events by outcome are counted where Track answers (``sluice_track_events_total``), and so is
the server-side time from a Track call's receipt to its answer (``sluice_track_ack_seconds``).

The log and the ingestor keep plain counters on their hot paths; this collector reads
them when Prometheus scrapes, so counting costs nothing between scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.events.ingest import DurableLog, Ingestor


class EventMetrics(Collector):
    """Exports one event log's (file or Redis Streams) and one ingestor's counters."""

    def __init__(self, log: DurableLog, ingestor: Ingestor) -> None:
        self.log = log
        self.ingestor = ingestor

    def collect(self) -> Iterator[Metric]:
        log, ing = self.log, self.ingestor
        counters = {
            "sluice_event_log_commits": ("group commits written", log.commits),
            "sluice_event_log_fsyncs": ("fdatasync calls", log.fsyncs),
            "sluice_event_log_records": ("records written", log.records_written),
            "sluice_event_log_bytes": ("bytes written", log.bytes_written),
            "sluice_event_log_commit_seconds": ("time spent in commits", log.commit_seconds_total),
            "sluice_event_log_truncated_bytes": (
                "torn tail bytes cut on recovery",
                log.truncated_bytes,
            ),
            "sluice_track_calls": ("Track calls", ing.track_calls),
            "sluice_track_batches_overloaded": (
                "batches refused for overload",
                ing.batches_overloaded,
            ),
            "sluice_track_events_recovered": ("events replayed at start", ing.events_recovered),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))
        yield GaugeMetricFamily(
            "sluice_event_log_last_commit_records",
            "records in the latest group commit",
            value=float(log.last_commit_records),
        )


TRACK_ACK_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.006,
    0.007,
    0.008,
    0.009,
    0.01,
    0.0125,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
TRACK_ACK_SECONDS = Histogram(
    "sluice_track_ack_seconds",
    "Track, server side: from the handler receiving the call to its answer (every ACCEPTED "
    "event durable); what the client sees adds the transport and its own wait for a core",
    buckets=TRACK_ACK_BUCKETS,
)


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile (0..1) of a Prometheus histogram given as ``(upper bound,
    cumulative count)`` pairs in increasing order (the last bound may be ``inf``), by
    linear interpolation inside the bucket, as PromQL's ``histogram_quantile`` does; ``nan``
    without observations. A quantile in the ``+Inf`` bucket is the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
