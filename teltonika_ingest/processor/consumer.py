"""The stream consumer: read, decode, write, acknowledge; claim; dead-letter.

One loop; one batch being written while the next one is read and decoded:

1. ``XGROUP CREATE <stream> <group> 0 MKSTREAM`` (nothing added before the first start is
   missed; an existing group is kept);
2. this consumer's own pending entries first (``XREADGROUP ... <cursor>``, after a restart),
   then new ones (``XREADGROUP ... >`` with ``BLOCK``); an ``XAUTOCLAIM`` pass at start and
   every ``claim_interval`` takes over entries idle longer than ``claim_idle`` in any
   consumer (a dead instance's, or this one's own poison entries);
3. decode each entry (:mod:`~teltonika_ingest.processor.decode`); write the rows in one
   transaction (:mod:`~teltonika_ingest.processor.writer`); ``XACK`` only after ``COMMIT``;
4. PostgreSQL down: nothing is acknowledged, reading pauses (the loop is retrying the
   batch, with backoff up to ``write_retry_max``) and resumes by itself;
5. an entry that does not decode, or that PostgreSQL refuses, is left pending; once its
   delivery count (``XPENDING``) reaches ``dlq_attempts`` it is added to the dead-letter
   stream with the error and acknowledged, in one ``MULTI``.

``stopService`` stops reading; the batch in flight is written and acknowledged (the
caller bounds the wait with the drain timeout). Unexpected errors are logged as critical
(counted in ``processor_unhandled_errors_total``) and the loop goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import psycopg
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel

from teltonika_ingest.processor.decode import DecodeError, PositionRow, decode_entry
from teltonika_ingest.processor.metrics import ProcessorMetrics
from teltonika_ingest.processor.pg import PgWorker, is_transient
from teltonika_ingest.processor.state import DeviceState
from teltonika_ingest.processor.writer import LastPosition, load_last_positions, write_batch
from teltonika_ingest.redis.client import RedisClient, RedisError, RedisReplyError

__all__ = [
    "DLQ_META_FIELDS",
    "Consumer",
    "Entry",
    "fields_of",
    "fired",
    "original_as_letter_fields",
]

log = Logger()

Entry = tuple[str, dict[str, Any] | None]
#: fields the dead-letter entry adds; an original field of the same name is kept as
#: ``original:<name>``
DLQ_META_FIELDS = ("entry_id", "error", "deliveries", "consumer", "instance_id", "failed_at")

_READ_BACKOFF_MIN = 0.2
_READ_BACKOFF_MAX = 5.0
_WRITE_BACKOFF_MIN = 0.2


def fields_of(flat: Sequence[Any] | None) -> dict[str, Any] | None:
    """A stream entry's flat ``[field, value, ...]`` list as a dict (None: entry deleted)."""
    if flat is None:
        return None
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in flat[0::2]]
    return dict(zip(names, flat[1::2], strict=False))


def _entries(reply: Any) -> list[Entry]:
    if not reply:
        return []
    out: list[Entry] = []
    for _stream, items in reply:
        for entry_id, flat in items or ():
            out.append((str(entry_id), fields_of(flat)))
    return out


def original_as_letter_fields(fields: dict[str, Any]) -> list[Any]:
    """An entry's own fields for its dead letter (flat); a name the letter uses itself is
    kept as ``original:<name>``."""
    out: list[Any] = []
    for name, value in fields.items():
        out += ["original:" + name if name in DLQ_META_FIELDS else name, value]
    return out


def fired(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with None) when ``d`` fires, without taking ``d``'s result."""
    out: Deferred[None] = Deferred()

    def passthrough(result: object) -> object:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(passthrough)
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@attrs.define
class _Batch:
    rows: list[PositionRow]
    poison: list[tuple[str, dict[str, Any], str]]
    gone: list[str]
    by_id: dict[str, dict[str, Any]]


class _Abandoned(Exception):
    """The batch was not written: shutting down while PostgreSQL failed."""


class Consumer(Service):
    name = "consumer"

    def __init__(
        self,
        *,
        reader: RedisClient,
        redis: RedisClient,
        writer: PgWorker,
        metrics: ProcessorMetrics,
        state: DeviceState,
        clock: Any,
        stream: str,
        group: str,
        consumer: str,
        dlq_stream: str,
        instance_id: str = "",
        batch_size: int = 1000,
        block_time: float = 1.0,
        claim_idle: float = 60.0,
        claim_interval: float = 30.0,
        dlq_attempts: int = 5,
        write_retry_max: float = 30.0,
        lag_interval: float = 5.0,
        write_fn: Callable[..., int] = write_batch,
        before: Deferred[None] | None = None,
    ) -> None:
        self.reader = reader
        self.redis = redis
        self.writer = writer
        self.metrics = metrics
        self.state = state
        self.clock = clock
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dlq_stream = dlq_stream
        self.instance_id = instance_id or consumer
        self.batch_size = batch_size
        self.block_ms = max(1, round(block_time * 1000))
        self.claim_idle_ms = max(1, round(claim_idle * 1000))
        self.claim_interval = claim_interval
        self.dlq_attempts = dlq_attempts
        self.write_retry_max = write_retry_max
        self.lag_interval = lag_interval
        self.write_fn = write_fn
        #: fires when the database is ready (migrations applied): reading starts then
        self.before = before
        #: called with the committed rows of each batch (new and resent ones) after COMMIT
        #: and XACK: the place for the live feed
        self.written_hooks: list[Callable[[Sequence[PositionRow]], object]] = []
        self.batches = 0
        self._stopping = False
        self._claim_due = True
        self._sleeping: Deferred[None] | None = None
        self._loop: Deferred[None] | None = None
        self._inflight: Deferred[None] | None = None
        self._claimer: LoopingCall | None = None
        self._lagger: LoopingCall | None = None
        self._write_failing_since: float | None = None
        #: the error of the batch write being retried (None: writes work)
        self.write_failing: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._claim_due = True
        self._claimer = LoopingCall(self._want_claim)
        self._claimer.clock = self.clock
        self._claimer.start(self.claim_interval, now=False)
        self._lagger = LoopingCall(self._poll_lag)
        self._lagger.clock = self.clock
        self._lagger.start(self.lag_interval, now=False).addErrback(
            lambda f: log.failure("lag poller stopped", f, level=LogLevel.critical)
        )
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(
            lambda f: log.failure("consumer loop ended", f, level=LogLevel.critical)
        )

    def stopService(self) -> Deferred[None]:
        """Stop reading; fires once the batch in flight is written and acknowledged."""
        super().stopService()
        self._stopping = True
        for loop in (self._claimer, self._lagger):
            if loop is not None and loop.running:
                loop.stop()
        self._wake()
        return self.drained()

    def drained(self) -> Deferred[None]:
        if self._loop is None or self._loop.called:
            return defer.succeed(None)
        return fired(self._loop)

    def _want_claim(self) -> None:
        self._claim_due = True

    def _wake(self) -> None:
        if self._sleeping is not None and not self._sleeping.called:
            self._sleeping.cancel()

    async def _sleep(self, seconds: float) -> None:
        self._sleeping = deferLater(self.clock, seconds, lambda: None)
        try:
            await self._sleeping
        except CancelledError:
            pass
        finally:
            self._sleeping = None

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        if self.before is not None and not self.before.called:
            await fired(self.before)
        if self._stopping:
            return
        await self._ensure_group()
        own_cursor: str | None = "0"  # own pending entries first; None: done
        while not self._stopping:
            try:
                if self._claim_due:
                    self._claim_due = False
                    await self._settle()
                    await self._claim_pass()
                    continue
                if own_cursor is not None:
                    entries = await self._read(own_cursor)
                    if entries is None:
                        continue
                    if not entries:
                        own_cursor = None
                        continue
                    own_cursor = entries[-1][0]
                else:
                    entries = await self._read(">")
                    if not entries:
                        continue
                # decode this batch while the previous one is being written (on the
                # database thread), then write it once that one is committed and acknowledged
                batch = self._prepare(entries)
                await self._settle()
                self._inflight = defer.ensureDeferred(self._commit(batch))
            except Exception:
                log.failure("consumer: unexpected error; going on", level=LogLevel.critical)
                await self._sleep(_READ_BACKOFF_MAX)
        await self._settle()
        log.info("consumer stopped reading ({batches} batches)", batches=self.batches)

    async def _settle(self) -> None:
        """Wait for the batch being written (and acknowledged), if any."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            try:
                await inflight
            except Exception:
                log.failure("consumer: batch write failed unexpectedly", level=LogLevel.critical)

    async def _ensure_group(self) -> None:
        delay = _READ_BACKOFF_MIN
        while not self._stopping:
            try:
                await self.redis.execute(
                    "XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM"
                )
                log.info(
                    "consumer group {group} created on {stream} at 0",
                    group=self.group,
                    stream=self.stream,
                )
                return
            except RedisReplyError as e:
                if e.code == "BUSYGROUP":
                    return
                log.error(
                    "cannot create consumer group {group}: {error}", group=self.group, error=e
                )
            except RedisError as e:
                log.warn("consumer group: Redis not available ({error})", error=e)
            await self._sleep(delay)
            delay = min(delay * 2, _READ_BACKOFF_MAX)

    async def _read(self, cursor: str) -> list[Entry] | None:
        """One XREADGROUP: entries (maybe none), or None after an error (already waited)."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer]
        args += ["COUNT", self.batch_size]
        if cursor == ">":
            args += ["BLOCK", self.block_ms]
        args += ["STREAMS", self.stream, cursor]
        try:
            reply = await self.reader.execute(*args, timeout=self.block_ms / 1000 + 5.0)
        except RedisError as e:
            self.metrics.reads.labels("error").inc()
            if isinstance(e, RedisReplyError) and e.code == "NOGROUP":
                log.warn("consumer group {group} is gone: creating it again", group=self.group)
                await self._ensure_group()
            elif not self._stopping:
                log.warn("XREADGROUP failed: {error}", error=e)
                await self._sleep(_READ_BACKOFF_MIN if self.reader.connected else 1.0)
            return None
        entries = _entries(reply)
        self.metrics.reads.labels("ok" if entries else "empty").inc()
        return entries

    async def _claim_pass(self) -> None:
        """XAUTOCLAIM every entry idle longer than claim_idle (cursor until 0-0)."""
        cursor = "0-0"
        while not self._stopping:
            try:
                reply = await self.redis.execute(
                    "XAUTOCLAIM", self.stream, self.group, self.consumer,
                    self.claim_idle_ms, cursor, "COUNT", self.batch_size,
                )  # fmt: skip
            except RedisError as e:
                self.metrics.reads.labels("error").inc()
                if isinstance(e, RedisReplyError) and e.code == "NOGROUP":
                    await self._ensure_group()
                else:
                    log.warn("XAUTOCLAIM failed: {error}", error=e)
                return
            cursor = str(reply[0])
            entries = [(str(i), fields_of(flat)) for i, flat in reply[1] or ()]
            self.metrics.reads.labels("ok" if entries else "empty").inc()
            if entries:
                self.metrics.claims.inc(len(entries))
                log.info("claimed {n} idle entries", n=len(entries))
                await self._process(entries)
            if cursor == "0-0":
                return

    # ------------------------------------------------------------------ one batch

    async def _process(self, entries: list[Entry]) -> None:
        await self._commit(self._prepare(entries))

    def _prepare(self, entries: list[Entry]) -> _Batch:
        """Decode a batch (CPU only)."""
        self.metrics.records.inc(len(entries))
        rows: list[PositionRow] = []
        poison: list[tuple[str, dict[str, Any], str]] = []
        gone: list[str] = []
        for entry_id, fields in entries:
            if fields is None:
                gone.append(entry_id)
                continue
            try:
                rows.append(decode_entry(entry_id, fields))
            except DecodeError as e:
                self.metrics.decode_errors.inc()
                log.warn("entry {entry_id} does not decode: {reason}", entry_id=entry_id, reason=e)
                poison.append((entry_id, fields, f"decode: {e}"))
        if gone:
            log.error(
                "{n} pending entries were deleted from {stream} before they were written "
                "(trimmed: raise the ingest's --stream-maxlen); acknowledging them",
                n=len(gone),
                stream=self.stream,
            )
        by_id = {entry_id: fields for entry_id, fields in entries if fields is not None}
        return _Batch(rows, poison, gone, by_id)

    async def _commit(self, batch: _Batch) -> None:
        """Write the rows, XACK, dead-letter or leave pending the poison entries."""
        rows, poison, gone, by_id = batch.rows, batch.poison, batch.gone, batch.by_id
        try:
            written, refused = await self._write(rows)
        except _Abandoned:
            self.metrics.writes.labels("failed").inc(len(rows))
            log.warn(
                "shutdown: {n} rows not written (PostgreSQL failing); their entries stay "
                "pending and are written after the next start",
                n=len(rows),
            )
            return
        for row, reason in refused:
            poison.append((row.entry_id, by_id[row.entry_id], f"write: {reason}"))
        await self._ack([row.entry_id for row in written] + gone)
        self.batches += 1
        for entry_id, fields, reason in poison:
            await self._poison(entry_id, fields, reason)
        if written:
            for hook in self.written_hooks:
                try:
                    hook(written)
                except Exception:
                    log.failure("written hook failed", level=LogLevel.critical)

    async def _write(
        self, rows: list[PositionRow]
    ) -> tuple[list[PositionRow], list[tuple[PositionRow, str]]]:
        """Write rows until committed (retrying while PostgreSQL is down). Returns the
        committed rows and those PostgreSQL refused (with the reason)."""
        if not rows:
            return [], []
        newest: dict[str, PositionRow] = {}
        for row in rows:
            known = newest.get(row.device_id)
            if known is None or row.ts > known.ts:
                newest[row.device_id] = row
        delay = _WRITE_BACKOFF_MIN
        while True:
            try:
                cold = self.state.cold(set(newest))
                if cold:
                    loaded = await self.writer.run(load_last_positions, cold)
                    self.metrics.state_loads.inc()
                    for device_id in cold:
                        self.state.seed(device_id, loaded.get(device_id))
                advance = [
                    row for d, row in newest.items() if self.state.advances(d, LastPosition.of(row))
                ]
                started = time.perf_counter()
                inserted = await self.writer.run(self.write_fn, rows, advance)
                self.metrics.write_duration.observe(time.perf_counter() - started)
                break
            except psycopg.Error as e:
                if not is_transient(e):
                    return await self._split(rows, e)
                self.metrics.write_retries.inc()
                self.metrics.postgres_up.set(0)
                now = self.clock.seconds()
                self.write_failing = _first_line(e)
                if self._write_failing_since is None:
                    self._write_failing_since = now
                    log.error(
                        "PostgreSQL write failed ({error}); not acknowledging, reading paused, "
                        "retrying with backoff",
                        error=self.write_failing,
                    )
                if self._stopping:
                    raise _Abandoned() from e
                await self._sleep(delay)
                delay = min(delay * 2, self.write_retry_max)
                if self._stopping:
                    raise _Abandoned() from e
        if self._write_failing_since is not None:
            log.info(
                "PostgreSQL writes work again after {s:.1f} s",
                s=self.clock.seconds() - self._write_failing_since,
            )
            self._write_failing_since = None
        self.write_failing = None
        self.metrics.postgres_up.set(1)
        # one observation per packet: its records are consecutive and share received_at
        # (packets received in the same millisecond count once: the delay is the same)
        committed = time.time()
        observe = self.metrics.commit_delay.observe
        previous = None
        for row in rows:
            if row.received_at != previous:
                previous = row.received_at
                observe(committed - previous.timestamp())
        self.metrics.writes.labels("inserted").inc(inserted)
        self.metrics.writes.labels("duplicate").inc(len(rows) - inserted)
        for device_id, row in newest.items():
            self.state.update(device_id, LastPosition.of(row))
        return rows, []

    async def _split(
        self, rows: list[PositionRow], error: psycopg.Error
    ) -> tuple[list[PositionRow], list[tuple[PositionRow, str]]]:
        """PostgreSQL refused the batch: find the refused rows by halving it."""
        reason = _first_line(error)
        if len(rows) == 1:
            self.metrics.writes.labels("failed").inc()
            log.warn(
                "PostgreSQL refused the row of entry {entry_id}: {reason}",
                entry_id=rows[0].entry_id,
                reason=reason,
            )
            return [], [(rows[0], reason)]
        mid = len(rows) // 2
        ok_a, bad_a = await self._write(rows[:mid])
        ok_b, bad_b = await self._write(rows[mid:])
        return ok_a + ok_b, bad_a + bad_b

    async def _ack(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            acked = await self.redis.execute("XACK", self.stream, self.group, *ids)
        except RedisError as e:
            self.metrics.ack_failures.inc()
            log.error(
                "XACK of {n} written entries failed ({error}): they stay pending and are "
                "written again (as duplicates) when claimed",
                n=len(ids),
                error=e,
            )
            return
        self.metrics.acks.inc(int(acked))

    async def _poison(self, entry_id: str, fields: dict[str, Any], reason: str) -> None:
        """Dead-letter the entry once delivered dlq_attempts times; else leave it pending."""
        try:
            reply = await self.redis.execute(
                "XPENDING", self.stream, self.group, entry_id, entry_id, 1
            )
            if not reply:
                return  # no longer pending (another consumer dealt with it)
            deliveries = int(reply[0][3])
            if deliveries < self.dlq_attempts:
                log.warn(
                    "entry {entry_id} left pending (delivery {n} of {max}): {reason}",
                    entry_id=entry_id,
                    n=deliveries,
                    max=self.dlq_attempts,
                    reason=reason,
                )
                return
            letter: list[Any] = [
                "entry_id", entry_id, "error", reason, "deliveries", deliveries,
                "consumer", self.consumer, "instance_id", self.instance_id,
                "failed_at", datetime.now(UTC).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
            ]  # fmt: skip
            letter += original_as_letter_fields(fields)
            await self.redis.transaction(
                [
                    ["XADD", self.dlq_stream, "*", *letter],
                    ["XACK", self.stream, self.group, entry_id],
                ]
            )
        except RedisError as e:
            log.error(
                "entry {entry_id}: dead-lettering failed ({error}); it stays pending",
                entry_id=entry_id,
                error=e,
            )
            return
        self.metrics.dead_letters.inc()
        self.metrics.acks.inc()
        log.error(
            "entry {entry_id} dead-lettered to {dlq} after {n} deliveries: {reason}",
            entry_id=entry_id,
            dlq=self.dlq_stream,
            n=deliveries,
            reason=reason,
        )

    # ------------------------------------------------------------------ lag

    async def _lag_once(self) -> None:
        try:
            groups = await self.redis.execute("XINFO", "GROUPS", self.stream)
        except RedisError:
            return
        for flat in groups or ():
            info = dict(zip(flat[0::2], flat[1::2], strict=False))
            if info.get("name") == self.group:
                if info.get("lag") is not None:
                    self.metrics.lag.set(int(info["lag"]))
                self.metrics.pending.set(int(info.get("pending") or 0))

    def _poll_lag(self) -> Deferred[None]:
        return defer.ensureDeferred(self._lag_once())
