"""``processor_live_*`` metrics, registered in the processor's own registry."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# from sub-millisecond (same host) to the seconds a stalled reader would show
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)

MESSAGE_TYPES = ("subscribed", "unsubscribed", "position", "error")
READ_RESULTS = ("ok", "empty", "error")
CLOSE_CODES = ("1000", "1001", "1006", "1008", "1009", "4000", "4001")


@attrs.frozen
class LiveMetrics:
    connections: Gauge
    subscriptions: Gauge
    messages: Counter
    dropped: Counter
    closes: Counter
    lag: Histogram
    ping_timeouts: Counter
    reads: Counter
    decode_errors: Counter
    token_reloads: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> LiveMetrics:
        m = cls(
            connections=Gauge(
                "processor_live_connections",
                "Live feed WebSocket connections open (authorised or not yet closed).",
                registry=registry,
            ),
            subscriptions=Gauge(
                "processor_live_subscriptions",
                'Live feed subscriptions: (client, device) pairs, a "*" counting once.',
                registry=registry,
            ),
            messages=Counter(
                "processor_live_messages_sent",
                "Live feed messages sent, by type.",
                ["type"],
                registry=registry,
            ),
            dropped=Counter(
                "processor_live_positions_dropped",
                "Positions not sent to a slow client because a newer one of the same "
                "device replaced them (or the client was closed with them pending).",
                registry=registry,
            ),
            closes=Counter(
                "processor_live_closes",
                "Live feed connections closed, by close code (1006: dropped without a "
                "close handshake, e.g. no pong).",
                ["code"],
                registry=registry,
            ),
            lag=Histogram(
                "processor_live_broadcast_lag_seconds",
                "Stream entry (its id's time) to the position written to the clients.",
                buckets=_LAG_BUCKETS,
                registry=registry,
            ),
            ping_timeouts=Counter(
                "processor_live_ping_timeouts",
                "Live feed clients dropped because they did not answer a ping in time.",
                registry=registry,
            ),
            reads=Counter(
                "processor_live_reads",
                "Broadcast reader XREAD calls, by result (ok, empty, error).",
                ["result"],
                registry=registry,
            ),
            decode_errors=Counter(
                "processor_live_decode_errors",
                "Stream entries the broadcast reader could not decode (not broadcast; the "
                "durable path dead-letters them).",
                registry=registry,
            ),
            token_reloads=Counter(
                "processor_live_token_reloads",
                "Token file loads (start and SIGHUP), by result (ok, error).",
                ["result"],
                registry=registry,
            ),
        )
        for t in MESSAGE_TYPES:
            m.messages.labels(t)
        for r in READ_RESULTS:
            m.reads.labels(r)
        for c in CLOSE_CODES:
            m.closes.labels(c)
        for r in ("ok", "error"):
            m.token_reloads.labels(r)
        return m
