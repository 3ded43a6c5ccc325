"""The event path's counters (``EventLog``, ``Ingestor``) as Prometheus metrics.

Events by outcome are counted where Track answers (``sluice_track_events_total``).

The log and the ingestor keep plain counters on their hot paths; this collector reads
them when Prometheus scrapes, so counting costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator

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
