"""Publishing decoded packets to the Redis telemetry stream (contract.md §2, §3).

One atomic write per packet: a Lua script XADDs every record of the packet in order, so a
packet is either wholly in the stream or (on failure before the script ran) not at all.
The caller ACKs the device only when the returned Deferred fires.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec import AvlPacket, format_timestamp, record_payload
from teltonika_ingest.metrics import Metrics
from teltonika_ingest.redisclient import (
    RedisClient,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    Script,
)

log = Logger()

# KEYS[1] stream; ARGV: maxlen ("0" = no trimming), imei, codec, then (ts, payload) pairs.
PUBLISH_SCRIPT = Script(
    """
local key, maxlen, imei, codec = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local n = 0
if maxlen == '0' then
  for i = 4, #ARGV, 2 do
    redis.call('XADD', key, '*', 'imei', imei, 'codec', codec,
               'ts', ARGV[i], 'payload', ARGV[i + 1])
    n = n + 1
  end
else
  for i = 4, #ARGV, 2 do
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'imei', imei, 'codec', codec,
               'ts', ARGV[i], 'payload', ARGV[i + 1])
    n = n + 1
  end
end
return n
"""
)


class PublishOverflow(Exception):
    """Too many publishes in flight (--max-inflight): not published, not ACKed."""


def failure_reason(exc: BaseException) -> str:
    """Short label for ``teltonika_publish_failures_total{reason}``."""
    if isinstance(exc, RedisTimeout):
        return "timeout"
    if isinstance(exc, RedisUnavailable):
        return "unavailable"
    if isinstance(exc, PublishOverflow):
        return "overflow"
    if isinstance(exc, RedisReplyError):
        return "error"
    return "error"


class Publisher:
    """Writes packets (and dead letters) to Redis, bounded by ``max_inflight``."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        stream: str,
        maxlen: int,
        max_inflight: int,
        metrics: Metrics,
        clock: IReactorTime,
        instance_id: str,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.dlq_stream = stream + ":dlq"
        self.maxlen = maxlen
        self._maxlen_arg = str(maxlen)
        self.max_inflight = max_inflight
        self.metrics = metrics
        self.clock = clock
        self.instance_id = instance_id
        self.inflight = 0
        self._drain_waiters: list[defer.Deferred[None]] = []

    # ------------------------------------------------------------------ telemetry

    def publish(self, imei: str, packet: AvlPacket, received_ms: int) -> defer.Deferred[int]:
        """XADD every record of ``packet``; fires with the record count once Redis has them."""
        if self.inflight >= self.max_inflight:
            self.metrics.publish_overflow.inc()
            self.metrics.publish_failures.labels(reason="overflow").inc()
            return defer.fail(PublishOverflow(f"{self.inflight} publishes in flight"))
        codec = packet.codec
        received_at = format_timestamp(received_ms)
        args: list[Any] = [self._maxlen_arg, imei, codec]
        for record in packet.records:
            args.append(format_timestamp(record.timestamp_ms))
            args.append(record_payload(record, imei, codec, received_at))
        return self._track(self.redis.run_script(PUBLISH_SCRIPT, [self.stream], args))

    # ------------------------------------------------------------------ dead letters

    def dead_letter(
        self, imei: str, codec: str, reason: str, raw: bytes, received_ms: int
    ) -> defer.Deferred[Any]:
        """XADD the whole undecodable frame to ``<stream>:dlq`` (contract.md §2)."""
        if self.inflight >= self.max_inflight:
            self.metrics.publish_overflow.inc()
            self.metrics.publish_failures.labels(reason="overflow").inc()
            return defer.fail(PublishOverflow(f"{self.inflight} publishes in flight"))
        args: list[Any] = ["XADD", self.dlq_stream]
        if self.maxlen:
            args += ["MAXLEN", "~", self._maxlen_arg]
        args += [
            "*",
            "imei",
            imei,
            "codec",
            codec,
            "reason",
            reason,
            "raw_b64",
            base64.b64encode(raw).decode("ascii"),
            "received_at",
            format_timestamp(received_ms),
            "instance_id",
            self.instance_id,
        ]
        return self._track(self.redis.execute(*args))

    # ------------------------------------------------------------------ in-flight accounting

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self.inflight += 1
        self.metrics.publish_inflight.inc()
        started = self.clock.seconds()

        def done(result: Any) -> Any:
            self.inflight -= 1
            self.metrics.publish_inflight.dec()
            if isinstance(result, Failure):
                reason = failure_reason(result.value)  # type: ignore[arg-type]
                self.metrics.publish_failures.labels(reason=reason).inc()
            else:
                self.metrics.publish_duration.observe(self.clock.seconds() - started)
            if self.inflight == 0 and self._drain_waiters:
                waiters, self._drain_waiters = self._drain_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        d.addBoth(done)
        return d

    def drain(self) -> defer.Deferred[None]:
        """Fires once no publish is in flight (used by graceful shutdown)."""
        if self.inflight == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter
