"""Prometheus metrics of one processor instance (contract.md section 9), in its own
``CollectorRegistry`` (the default registry is process-global)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# as the ingest's: no *_created series (process-wide; the same call as server/metrics.py)
prometheus_client.disable_created_metrics()

READ_RESULTS = ("ok", "empty", "error")
WRITE_STATUSES = ("inserted", "duplicate", "failed")

_DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProcessorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=registry)
        self.reads = Counter(
            "processor_consumer_reads_total",
            "XREADGROUP / XAUTOCLAIM calls by result (ok: entries, empty: none, error).",
            ["result"],
            registry=registry,
        )
        self.records = Counter(
            "processor_consumer_records_total",
            "Stream entries received (read or claimed), including malformed ones.",
            registry=registry,
        )
        self.lag = Gauge(
            "processor_consumer_lag",
            "Entries in the stream not yet delivered to the group (XINFO GROUPS lag).",
            registry=registry,
        )
        self.pending = Gauge(
            "processor_consumer_pending",
            "Entries delivered to the group and not yet acknowledged (XINFO GROUPS pending).",
            registry=registry,
        )
        self.decode_errors = Counter(
            "processor_decode_errors_total",
            "Stream entries that could not be decoded into a row (left pending).",
            registry=registry,
        )
        self.writes = Counter(
            "processor_position_writes_total",
            "Rows written to positions by status (inserted, duplicate: already there, "
            "failed: refused by PostgreSQL or not written because it was down).",
            ["status"],
            registry=registry,
        )
        self.write_duration = Histogram(
            "processor_write_duration_seconds",
            "Time of one successful batch write (COPY, INSERT, last_positions, COMMIT).",
            buckets=_WRITE_BUCKETS,
            registry=registry,
        )
        self.commit_delay = Histogram(
            "processor_commit_delay_seconds",
            "Seconds from the ingest receiving a packet (its records' received_at) to the "
            "COMMIT of their rows, one observation per run of consecutive rows with the same "
            "received_at (a packet, or packets of the same millisecond): an upper bound of "
            "ACK-to-visible, clock skew between hosts included.",
            buckets=_DELAY_BUCKETS,
            registry=registry,
        )
        self.write_retries = Counter(
            "processor_write_retries_total",
            "Batch writes retried after PostgreSQL failed (down, restarting, timed out).",
            registry=registry,
        )
        self.acks = Counter(
            "processor_acks_total",
            "Stream entries acknowledged (XACK) after their rows were committed or they "
            "were dead-lettered.",
            registry=registry,
        )
        self.ack_failures = Counter(
            "processor_ack_failures_total",
            "XACK calls that failed (the entries stay pending and are delivered again).",
            registry=registry,
        )
        self.claims = Counter(
            "processor_claims_total",
            "Entries claimed by XAUTOCLAIM (idle longer than --claim-idle in any consumer).",
            registry=registry,
        )
        self.dead_letters = Counter(
            "processor_dead_letters_total",
            "Entries moved to the processor's dead-letter stream after --dlq-attempts deliveries.",
            registry=registry,
        )
        self.state_size = Gauge(
            "processor_device_state_size",
            "Devices whose last position is in memory.",
            registry=registry,
        )
        self.state_evictions = Counter(
            "processor_device_state_evictions_total",
            "Devices evicted from the in-memory state (--device-state-size reached).",
            registry=registry,
        )
        self.state_loads = Counter(
            "processor_device_state_loads_total",
            "Queries of last_positions for devices not in memory (one per batch with any).",
            registry=registry,
        )
        self.postgres_up = Gauge(
            "processor_postgres_up",
            "1 when the last PostgreSQL check or write succeeded, else 0.",
            registry=registry,
        )
        self.redis_up = Gauge(
            "processor_redis_up",
            "1 while the Redis connection is up, else 0.",
            registry=registry,
        )
        self.unhandled_errors = Counter(
            "processor_unhandled_errors_total",
            "Errors logged that no code path handled (each is also logged with a traceback).",
            registry=registry,
        )
        for result in READ_RESULTS:
            self.reads.labels(result)
        for status in WRITE_STATUSES:
            self.writes.labels(status)
