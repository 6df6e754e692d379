"""Prometheus metrics of one service instance (contract.md §5).

Each service gets its own ``CollectorRegistry`` (the default registry is process-global
and would refuse a second service built in the same process, e.g. in tests).

No ``*_created`` series: prometheus_client's ``disable_created_metrics()`` (process-wide, set
when this module is imported) turns them off; they double the series count for nothing the
alerts or the dashboard use.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from teltonika_ingest.buildinfo import build_info

prometheus_client.disable_created_metrics()

# Latency buckets sized for loopback Redis publishes (sub-millisecond) up to the
# publish timeout (seconds).
_FAST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Event-loop stalls and collector pauses: from well under a millisecond (a healthy loop) to
# seconds (a stall that makes devices resend).
_STALL_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_COMMAND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HANDSHAKE_RESULTS = ("accepted", "rejected", "malformed", "timeout")
FRAME_RESULTS = ("ok", "crc_fail", "malformed", "dead_lettered", "too_large", "unknown_codec")
GC_GENERATIONS = ("0", "1", "2")
CONNECTION_LIMITS = ("max_connections", "per_address")
BUDGETS = ("device_messages", "dead_letters")
#: the payload's data-quality flags (contract.md section 8): teltonika_records_flagged_total{flag}
QUALITY_FLAGS = ("gps_valid", "time_valid")
COMMAND_STATUSES = (
    "ok",
    "nack",
    "timeout",
    "not_connected",
    "invalid",
    "message",
    "expired",
    "failed",
    "cancelled",
)
PUBLISH_FAILURE_REASONS = ("unavailable", "timeout", "overflow", "error")
DEAD_LETTER_REASONS = ("unknown_codec", "malformed")
UDP_RESULTS = ("ok", "duplicate", "malformed", "rejected", "publish_failed")
AVL_CODECS = ("8", "8E", "16")
# From seconds (device online) to days (offline for the whole TTL).
_QUEUE_DELAY_BUCKETS = (
    0.1,
    0.5,
    1.0,
    5.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
    86400.0,
    604800.0,
)


class Metrics:
    """All metrics of the service, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, open fds, CPU

        self.build_info = Gauge(
            "teltonika_build_info",
            "Always 1; the labels say what runs: package version, Python, Twisted, and whether "
            "the compiled decoder is on (on, off, not_built).",
            ["version", "python", "twisted", "compiled"],
            registry=registry,
        )
        self.build_info.labels(**build_info()).set(1)

        # --- connections
        self.connections_active = Gauge(
            "teltonika_connections_active",
            "Device TCP connections currently open.",
            registry=registry,
        )
        self.connections_total = Counter(
            "teltonika_connections_total",
            "Device TCP connections accepted by the listener.",
            registry=registry,
        )
        self.connections_refused = Counter(
            "teltonika_connections_refused_total",
            "Device TCP connections refused, by the limit reached (max_connections: "
            "--max-connections, per_address: --max-connections-per-address).",
            ["limit"],
            registry=registry,
        )
        self.disconnects = Counter(
            "teltonika_disconnects_total",
            "Device connections closed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.handshakes = Counter(
            "teltonika_handshakes_total",
            "IMEI handshakes by result (accepted, rejected, malformed, timeout).",
            ["result"],
            registry=registry,
        )
        self.keepalives = Counter(
            "teltonika_keepalives_total",
            "Keep-alive (0xFF) bytes received from devices.",
            registry=registry,
        )
        self.bytes_received = Counter(
            "teltonika_bytes_received_total",
            "Bytes received from devices (TCP and UDP).",
            registry=registry,
        )

        # --- frames and records
        self.frames = Counter(
            "teltonika_frames_total",
            "Frames received, by codec and result "
            "(ok, crc_fail, malformed, dead_lettered, too_large, unknown_codec).",
            ["codec", "result"],
            registry=registry,
        )
        self.records = Counter(
            "teltonika_records_total",
            "AVL records published and ACKed, by codec (8, 8E, 16).",
            ["codec"],
            registry=registry,
        )
        self.records_flagged = Counter(
            "teltonika_records_flagged_total",
            "Records published with a data-quality flag false, by flag (gps_valid, "
            "time_valid); they are published all the same.",
            ["flag"],
            registry=registry,
        )
        for flag in QUALITY_FLAGS:
            self.records_flagged.labels(flag=flag)
        self.model_lookup_failures = Counter(
            "teltonika_model_lookup_failures_total",
            "Device model lookups in the Redis hash (--io-names, --model-key) that failed; "
            "the allow-list file and --default-model named those records.",
            registry=registry,
        )
        self.unknown_codec = Counter(
            "teltonika_unknown_codec_total",
            "CRC-valid frames with a codec id this service does not know.",
            registry=registry,
        )
        self.udp_datagrams = Counter(
            "teltonika_udp_datagrams_total",
            "UDP datagrams by result (ok, duplicate, malformed, rejected, publish_failed).",
            ["result"],
            registry=registry,
        )

        # --- publishing
        self.publish_duration = Histogram(
            "teltonika_publish_duration_seconds",
            "Time from handing a packet to Redis to Redis confirming it.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.publish_failures = Counter(
            "teltonika_publish_failures_total",
            "Packets not published (not ACKed; the device resends), by reason "
            "(unavailable, timeout, overflow, error).",
            ["reason"],
            registry=registry,
        )
        self.publish_overflow = Counter(
            "teltonika_publish_overflow_total",
            "Packets refused: --max-inflight in flight and 8 x --max-inflight waiting.",
            registry=registry,
        )
        self.publish_inflight = Gauge(
            "teltonika_publish_inflight",
            "Packets handed to Redis and not yet confirmed.",
            registry=registry,
        )
        self.publish_waiting = Gauge(
            "teltonika_publish_waiting",
            "Packets waiting for an in-flight slot (--max-inflight reached).",
            registry=registry,
        )
        self.publish_backpressure = Counter(
            "teltonika_publish_backpressure_total",
            "Times reading from devices was paused: --max-inflight in flight, as many waiting.",
            registry=registry,
        )
        self.ack_latency = Histogram(
            "teltonika_ack_latency_seconds",
            "Time from a complete frame received to its ACK written.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.buffered_bytes = Gauge(
            "teltonika_buffered_bytes",
            "Bytes of partial frames buffered for all device connections.",
            registry=registry,
        )
        self.memory_pauses = Counter(
            "teltonika_memory_pauses_total",
            "Device connections no longer read because --max-buffered-bytes was reached "
            "(those with the biggest buffers first).",
            registry=registry,
        )
        self.budget_exceeded = Counter(
            "teltonika_budget_exceeded_total",
            "Events beyond a device's per-minute budget, by budget (device_messages: dropped; "
            "dead_letters: not stored, not ACKed, connection closed).",
            ["budget"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "teltonika_dead_letters_total",
            "Frames written to the dead-letter stream, by reason (unknown_codec, malformed).",
            ["reason"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "teltonika_redis_up",
            "1 while the service's main Redis connection is established, else 0.",
            registry=registry,
        )

        # --- registry and heartbeat
        self.registry_failures = Counter(
            "teltonika_registry_failures_total",
            "Failed registry writes (register, unregister, janitor).",
            registry=registry,
        )
        self.heartbeat_failures = Counter(
            "teltonika_heartbeat_failures_total",
            "Failed heartbeat writes.",
            registry=registry,
        )
        self.janitor_removed = Counter(
            "teltonika_janitor_removed_total",
            "Registry fields removed because their instance had no heartbeat.",
            registry=registry,
        )

        # --- commands
        self.commands = Counter(
            "teltonika_commands_total",
            "GPRS command outcomes by status (ok, nack, timeout, not_connected, invalid; "
            "queued commands also expired, failed, cancelled) and device messages (message).",
            ["status"],
            registry=registry,
        )
        self.commands_inflight = Gauge(
            "teltonika_commands_inflight",
            "GPRS commands written to a device and awaiting its answer.",
            registry=registry,
        )
        self.command_roundtrip = Histogram(
            "teltonika_command_roundtrip_seconds",
            "Time from a command written to a device to its answer.",
            buckets=_COMMAND_BUCKETS,
            registry=registry,
        )

        # --- queued commands (commands:queue)
        self.queue_depth = Gauge(
            "teltonika_commands_queued",
            "Queued commands in Redis (all devices, all instances), as of this instance's "
            "last sweep.",
            registry=registry,
        )
        self.queue_delivered = Counter(
            "teltonika_commands_delivered_total",
            "Queued commands written to a device (every attempt).",
            registry=registry,
        )
        self.queue_delay = Histogram(
            "teltonika_command_queue_delay_seconds",
            "Time from a command queued to its delivery written to the device.",
            buckets=_QUEUE_DELAY_BUCKETS,
            registry=registry,
        )

        # --- process health
        self.session_errors = Counter(
            "teltonika_session_errors_total",
            "Unexpected exceptions inside one device session (that session was closed).",
            registry=registry,
        )
        self.unhandled_errors = Counter(
            "teltonika_unhandled_errors_total",
            "Unhandled errors logged at critical (e.g. Deferred failures garbage-collected).",
            registry=registry,
        )

        # --- where a slow ACK comes from (docs/profile.md, "Tail latency")
        self.reactor_lag = Histogram(
            "teltonika_reactor_lag_seconds",
            "How late a periodic event-loop timer fired (every 0.1 s): the loop was busy or "
            "the process was not scheduled.",
            buckets=_STALL_BUCKETS,
            registry=registry,
        )
        self.gc_pause = Histogram(
            "teltonika_gc_pause_seconds",
            "Garbage collector pauses, by generation (0, 1, 2).",
            ["generation"],
            buckets=_STALL_BUCKETS,
            registry=registry,
        )
        self.frame_to_publish = Histogram(
            "teltonika_frame_to_publish_seconds",
            "Time from a complete frame (or UDP datagram) received to its publish call sent to "
            "Redis (batching and --max-inflight waits).",
            buckets=_STALL_BUCKETS,
            registry=registry,
        )
        self.reply_to_ack = Histogram(
            "teltonika_reply_to_ack_seconds",
            "Time from Redis' reply to a publish call to the ACK of one of its packets written.",
            buckets=_STALL_BUCKETS,
            registry=registry,
        )

        # Make the labelled series visible (at 0) before the first event, so that
        # rate() and alert rules work from the start.
        for result in HANDSHAKE_RESULTS:
            self.handshakes.labels(result=result)
        for status in COMMAND_STATUSES:
            self.commands.labels(status=status)
        for generation in GC_GENERATIONS:
            self.gc_pause.labels(generation=generation)
        for limit in CONNECTION_LIMITS:
            self.connections_refused.labels(limit=limit)
        for reason in PUBLISH_FAILURE_REASONS:
            self.publish_failures.labels(reason=reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for result in UDP_RESULTS:
            self.udp_datagrams.labels(result=result)
        for codec in AVL_CODECS:
            self.records.labels(codec=codec)
            self.frames.labels(codec=codec, result="ok")
        for budget in BUDGETS:
            self.budget_exceeded.labels(budget=budget)
