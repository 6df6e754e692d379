"""Publishing decoded packets to the Redis telemetry stream (contract.md §2, §3).

Packets are written in batches: every packet handed over during one pass of the event loop
(all the device sockets that were readable together) goes to Redis in one ``EVALSHA`` of
:data:`PUBLISH_SCRIPT`, which XADDs the records of each packet consecutively, in packet order.
A batch lands wholly or not at all, so each packet does too (contract.md §2): no other
client's command runs while a script runs; the script checks the whole batch (key type,
argument shape) before its first write; and out of memory Redis refuses only a script's first
write (see :data:`PUBLISH_SCRIPT`), so a refused batch wrote nothing. Proven against a real
``redis-server`` under ``maxmemory`` + ``noeviction`` in tests/test_publisher_redis.py. Not
tested here: Redis dying in the middle of a script (Redis propagates a script's writes to its
AOF and replicas as one ``MULTI``/``EXEC`` once the script has finished). The caller ACKs a
device only when its packet's Deferred fires, which is after Redis answered the whole batch.
A batch is sent at the end of the current pass, or at once when it reaches
:data:`BATCH_MAX_RECORDS` records or :data:`BATCH_MAX_BYTES` bytes.

Why batches: one script call per packet cost the service ~20 µs of Redis client work and
Redis ~25 µs per call on top of each XADD; measured in BENCHMARKS.md ("Batching").
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.catalog import ModelView, io_object
from teltonika_ingest.codec import AvlFrame, AvlPacket, format_timestamp, record_payload
from teltonika_ingest.codec.imei import IMEI_LENGTH
from teltonika_ingest.codec.payload import (
    DEFAULT_TIME_WINDOW_MS,
    gps_valid,
    payloads_and_flags,
    time_limit_ms,
    time_valid,
)
from teltonika_ingest.redis.client import (
    RedisClient,
    RedisTimeout,
    RedisUnavailable,
    Script,
)
from teltonika_ingest.redis.trim import TRIM_TO_BYTES
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.models import DeviceModels

log = Logger()

#: a batch is sent as soon as it holds this many records ...
BATCH_MAX_RECORDS = 512
#: ... or this many payload bytes (a Lua call blocks Redis while it runs: keep it short)
BATCH_MAX_BYTES = 1 << 20

#: packets waiting for an in-flight slot, at most this many times --max-inflight
WAITING_FACTOR = 8

# KEYS[1] stream; ARGV[1] maxlen ("0" = no trimming), then per packet:
# imei, codec, record count n, then n (ts, payload) pairs. Returns the records added.
# Redis has no rollback: a script that fails half-way keeps what it wrote. So the whole batch
# is checked first (the key holds a stream or nothing; every packet's count matches its
# arguments), and only then written. Out of memory (maxmemory + noeviction), Redis refuses a
# script's first write and never a later one, so that refusal writes nothing either.
PUBLISH_SCRIPT = Script(
    """
local key, maxlen = KEYS[1], ARGV[1]
local i, last, total = 2, #ARGV, 0
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. kind .. ': nothing written')
end
while i <= last do
  local n = tonumber(ARGV[i + 2])
  if n == nil or n < 0 or n % 1 ~= 0 or i + 2 + 2 * n > last then
    return redis.error_reply('ERR malformed batch at argument ' .. i .. ': nothing written')
  end
  i = i + 3 + 2 * n
end
i = 2
while i <= last do
  local imei, codec, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local stop = i + 2 * n - 1
  if maxlen == '0' then
    for j = i, stop, 2 do
      redis.call('XADD', key, '*', 'imei', imei, 'codec', codec,
                 'ts', ARGV[j], 'payload', ARGV[j + 1])
    end
  else
    for j = i, stop, 2 do
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'imei', imei, 'codec', codec,
                 'ts', ARGV[j], 'payload', ARGV[j + 1])
    end
  end
  i = stop + 1
  total = total + n
end
return total
"""
)


# KEYS[1] dead-letter stream; ARGV[1] maxlen ("0" = no trimming by entries), ARGV[2] most
# bytes ("0" = no byte bound), ARGV[3..] the entry's field/value pairs. Returns the entry id.
DEAD_LETTER_SCRIPT = Script(
    TRIM_TO_BYTES
    + """
local id
if ARGV[1] == '0' then
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
end
trim_to_bytes(KEYS[1], ARGV[2])
return id
"""
)


#: (Deferred, record count) of each packet in a batch
_Batch = list[tuple[defer.Deferred[int], int]]


class PublishOverflow(Exception):
    """Too many publishes in flight (--max-inflight): not published, not ACKed."""


def failure_reason(exc: BaseException) -> str:
    """Short label for ``teltonika_publish_failures_total{reason}``: ``timeout``,
    ``unavailable``, ``overflow``, else ``error`` (an error reply, or anything unexpected)."""
    if isinstance(exc, RedisTimeout):
        return "timeout"
    if isinstance(exc, RedisUnavailable):
        return "unavailable"
    if isinstance(exc, PublishOverflow):
        return "overflow"
    return "error"


class _DeadLetterCommand:
    """A dead letter waiting for an in-flight slot (its ``XADD``, sent when admitted)."""

    __slots__ = ("args",)

    def __init__(self, args: list[Any]) -> None:
        self.args = args


class Publisher:
    """Writes packets (in batches) and dead letters to Redis, bounded by ``max_inflight``.

    ``max_inflight`` bounds the packets handed to Redis and not yet confirmed. A packet that
    arrives while that many are in flight *waits* (in arrival order; sent as soon as a batch
    comes back and frees slots). Once as many packets wait as are in flight,
    ``pressure_hooks`` are called with True, so the listeners stop reading from devices until
    no packet waits any more (``False``): under overload the devices wait with their data,
    instead of being refused and reconnecting. (Pausing at the first waiting packet and
    resuming at half the bound, as first written, left the pipeline half empty on each cycle:
    79k instead of 103k records/s with 2,000 devices back-to-back.) Only when ``max_waiting``
    (8 x ``max_inflight``) packets are already waiting is a packet refused
    (``PublishOverflow``: not ACKed, the device resends). Dead letters take the same slots
    and wait the same way.
    """

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
        batch_max_records: int = BATCH_MAX_RECORDS,
        batch_max_bytes: int = BATCH_MAX_BYTES,
        dlq_max_bytes: int = 0,
        time_window_ms: int = DEFAULT_TIME_WINDOW_MS,
        models: DeviceModels | None = None,
    ) -> None:
        self.redis = redis
        #: time_valid is false more than this after received_at (--time-valid-window)
        self.time_window_ms = time_window_ms
        #: --io-names: each payload gains the "io" object for the device's model
        self.models = models
        flagged = metrics.records_flagged
        self._flagged = (flagged.labels(flag="gps_valid"), flagged.labels(flag="time_valid"))
        self.stream = stream
        self._keys = [stream]
        self.dlq_stream = stream + ":dlq"
        #: the dead-letter stream's byte bound (0: entries only)
        self.dlq_max_bytes = dlq_max_bytes
        self.maxlen = maxlen
        self._maxlen_arg = str(maxlen)
        self.max_inflight = max_inflight
        #: packets that may wait for a slot: reading pauses once max_inflight wait, so past
        #: that only packets read in the same pass of the event loop (or UDP) pile up here
        self.max_waiting = WAITING_FACTOR * max_inflight
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.metrics = metrics
        self.clock = clock
        self.instance_id = instance_id
        #: packets (and dead letters) handed to Redis, not yet answered
        self.inflight = 0
        #: called with True when packets start waiting for an in-flight slot, False when the
        #: backlog is gone (the factory pauses and resumes reading the device sockets)
        self.pressure_hooks: list[Any] = []
        self.under_pressure = False
        self._drain_waiters: list[defer.Deferred[None]] = []
        # the batch being filled: script arguments, (Deferred, records) per packet, sizes
        self._args: list[Any] = [self._maxlen_arg]
        self._batch: _Batch = []
        self._frame_times: list[float] = []  # when each packet of the batch was complete
        self._batch_records = 0
        self._batch_bytes = 0
        self._flush_call: IDelayedCall | None = None
        # packets waiting for an in-flight slot: (args segment, Deferred, records, bytes,
        # when complete); a dead letter's segment is its _DeadLetterCommand
        self._waiting: list[
            tuple[list[Any] | _DeadLetterCommand, defer.Deferred[Any], int, int, float]
        ] = []
        #: clock.seconds() of the last publish call Redis answered: the packets' callbacks run
        #: right after it (the ACKs: teltonika_reply_to_ack_seconds)
        self.replied_at = 0.0
        metrics.publish_inflight.set_function(lambda: self.inflight)
        metrics.publish_waiting.set_function(lambda: len(self._waiting))

    # ------------------------------------------------------------------ telemetry

    def publish(
        self, imei: str, packet: AvlPacket, received_ms: int, frame_at: float | None = None
    ) -> defer.Deferred[int]:
        """XADD every record of ``packet``; fires with the record count once Redis has them.

        ``frame_at`` (``clock.seconds()``; default now) is when the packet was complete: the
        wait until its publish call is sent is ``teltonika_frame_to_publish_seconds``."""
        models = self.models
        if models is not None:
            view = models.view(imei)
            if isinstance(view, defer.Deferred):  # the first packet of this device in a while
                return view.addCallback(
                    lambda v: self._publish(imei, packet, received_ms, frame_at, v)
                )
            return self._publish(imei, packet, received_ms, frame_at, view)
        return self._publish(imei, packet, received_ms, frame_at, None)

    def _publish(
        self,
        imei: str,
        packet: AvlPacket,
        received_ms: int,
        frame_at: float | None,
        view: ModelView | None,
    ) -> defer.Deferred[int]:
        codec = packet.codec
        received_at = format_timestamp(received_ms)
        limit = time_limit_ms(received_ms, self.time_window_ms)
        records = packet.records
        segment: list[Any] = [imei, codec, len(records)]
        size = 0
        gps_bad = time_bad = 0
        for record in records:
            io = None if view is None else io_object(view, record)
            payload = record_payload(record, imei, codec, received_at, limit=limit, io=io)
            size += len(payload)
            ts = format_timestamp(record.timestamp_ms)
            segment.append(ts)
            segment.append(payload)
            gps_bad += not gps_valid(record)
            time_bad += not time_valid(ts, limit)
        return self._counted(
            self._enqueue(segment, len(records), size, frame_at), gps_bad, time_bad
        )

    def publish_frame(
        self, imei: str, frame: AvlFrame, received_ms: int, frame_at: float | None = None
    ) -> defer.Deferred[int]:
        """:meth:`publish` for a framed packet: uses the payload pieces of the compiled path
        (``frame.parts``) when there are some, else the decoded packet."""
        parts = frame.parts
        if (
            parts is None
            or self.models is not None
            or not (len(imei) == IMEI_LENGTH and imei.isdigit())
        ):  # the compiled path has no names: --io-names decodes in Python
            return self.publish(imei, frame.packet, received_ms, frame_at)
        received_at = format_timestamp(received_ms)
        flat, gps_bad, time_bad = payloads_and_flags(
            imei, received_at, parts, time_limit_ms(received_ms, self.time_window_ms)
        )
        count = frame.record_count
        segment: list[Any] = [imei, frame.codec, count, *flat]
        d = self._enqueue(segment, count, sum(map(len, flat)), frame_at)
        return self._counted(d, gps_bad, time_bad)

    def _counted(self, d: defer.Deferred[int], gps_bad: int, time_bad: int) -> defer.Deferred[int]:
        """Count the flagged records once Redis has them (as teltonika_records_total is)."""
        if gps_bad or time_bad:
            d.addCallback(self._count_flags, gps_bad, time_bad)
        return d

    def _count_flags(self, records: int, gps_bad: int, time_bad: int) -> int:
        gps, time = self._flagged
        if gps_bad:
            gps.inc(gps_bad)
        if time_bad:
            time.inc(time_bad)
        return records

    def _enqueue(
        self, segment: list[Any], records: int, size: int, frame_at: float | None
    ) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        if frame_at is None:
            frame_at = self.clock.seconds()
        if self._must_wait():
            return self._wait(segment, d, records, size, frame_at)
        self._add(segment, d, records, size, frame_at)
        return d

    def _must_wait(self) -> bool:
        return self.inflight + len(self._batch) >= self.max_inflight or bool(self._waiting)

    def _wait(
        self,
        segment: list[Any] | _DeadLetterCommand,
        d: defer.Deferred[Any],
        records: int,
        size: int,
        frame_at: float,
    ) -> defer.Deferred[Any]:
        """Queue a packet (or dead letter) for an in-flight slot; refuse past max_waiting."""
        waiting = self._waiting
        if len(waiting) >= self.max_waiting:
            self.metrics.publish_overflow.inc()
            self.metrics.publish_failures.labels(reason="overflow").inc()
            return defer.fail(
                PublishOverflow(f"{self.inflight} publishes in flight, {len(waiting)} waiting")
            )
        waiting.append((segment, d, records, size, frame_at))
        if len(waiting) >= self.max_inflight and not self.under_pressure:
            self._set_pressure(True)
        return d

    def _add(
        self, segment: list[Any], d: defer.Deferred[int], records: int, size: int, frame_at: float
    ) -> None:
        self._args += segment
        self._batch.append((d, records))
        self._frame_times.append(frame_at)
        self._batch_records += records
        self._batch_bytes += size
        if (
            self._batch_records >= self.batch_max_records
            or self._batch_bytes >= self.batch_max_bytes
        ):
            self._flush()
        elif self._flush_call is None:
            # after the other sockets readable in this pass of the event loop had their turn
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        batch = self._batch
        if not batch:
            return
        args = self._args
        frame_times = self._frame_times
        self._args = [self._maxlen_arg]
        self._batch = []
        self._frame_times = []
        self._batch_records = self._batch_bytes = 0
        self.inflight += len(batch)
        d = self.redis.run_script(PUBLISH_SCRIPT, self._keys, args)
        now = self.clock.seconds()
        observe = self.metrics.frame_to_publish.observe
        for frame_at in frame_times:
            observe(now - frame_at)
        d.addCallbacks(
            self._batch_done,
            self._batch_failed,
            callbackArgs=(batch, self.clock.seconds()),
            errbackArgs=(batch,),
        )

    def _batch_done(self, _total: Any, batch: _Batch, started: float) -> None:
        self.inflight -= len(batch)
        observe = self.metrics.publish_duration.observe
        self.replied_at = now = self.clock.seconds()
        elapsed = now - started
        for d, records in batch:
            observe(elapsed)
            d.callback(records)
        self._settled()

    def _batch_failed(self, failure: Failure, batch: _Batch) -> None:
        self.inflight -= len(batch)
        reason = failure_reason(failure.value)  # type: ignore[arg-type]
        self.metrics.publish_failures.labels(reason=reason).inc(len(batch))
        for d, _records in batch:
            d.errback(failure)
        self._settled()

    def _settled(self) -> None:
        """A batch came back: let waiting packets in, lift the pressure, wake drain()."""
        waiting = self._waiting
        if waiting:
            room = self.max_inflight - self.inflight - len(self._batch)
            if room > 0:
                admitted, self._waiting = waiting[:room], waiting[room:]
                for segment, d, records, size, frame_at in admitted:
                    if type(segment) is _DeadLetterCommand:
                        self._send_dead_letter(segment.args, d)
                    else:
                        self._add(segment, d, records, size, frame_at)  # type: ignore[arg-type]
        if self.under_pressure and not self._waiting:
            self._set_pressure(False)
        if self.inflight == 0 and not self._batch and not self._waiting and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _set_pressure(self, on: bool) -> None:
        self.under_pressure = on
        if on:
            self.metrics.publish_backpressure.inc()
        for hook in list(self.pressure_hooks):
            try:
                hook(on)
            except Exception:
                log.failure("publish pressure hook failed")

    # ------------------------------------------------------------------ dead letters

    def dead_letter(
        self, imei: str, codec: str, reason: str, raw: bytes, received_ms: int
    ) -> defer.Deferred[Any]:
        """XADD the whole undecodable frame to ``<stream>:dlq`` (contract.md §2), trimmed to
        ``--stream-maxlen`` entries and ``dlq_max_bytes`` bytes. Like a packet, it takes an
        in-flight slot, and waits for one at ``max_inflight``."""
        args: list[Any] = [
            self._maxlen_arg,
            self.dlq_max_bytes,
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
        d: defer.Deferred[Any] = defer.Deferred()
        if self._must_wait():
            return self._wait(_DeadLetterCommand(args), d, 0, 0, self.clock.seconds())
        self._send_dead_letter(args, d)
        return d

    def _send_dead_letter(self, args: list[Any], d: defer.Deferred[Any]) -> None:
        script = self.redis.run_script(DEAD_LETTER_SCRIPT, [self.dlq_stream], args)
        self._track(script).chainDeferred(d)

    # ------------------------------------------------------------------ in-flight accounting

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self.inflight += 1
        started = self.clock.seconds()

        def done(result: Any) -> Any:
            self.inflight -= 1
            if isinstance(result, Failure):
                reason = failure_reason(result.value)  # type: ignore[arg-type]
                self.metrics.publish_failures.labels(reason=reason).inc()
            else:
                self.metrics.publish_duration.observe(self.clock.seconds() - started)
            self._settled()
            return result

        d.addBoth(done)
        return d

    def drain(self) -> defer.Deferred[None]:
        """Fires once no publish is in flight, batched or waiting (graceful shutdown)."""
        if self.inflight == 0 and not self._batch and not self._waiting:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter
