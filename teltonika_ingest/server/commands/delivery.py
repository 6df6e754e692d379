"""Queued commands, the service: accept ``commands:queue`` entries, deliver to held devices.

The data model and its scripts are in ``queue.py``; the guarantees in OPERATIONS.md. This
module is what one instance does:

* **Read** ``commands:queue`` (consumer group ``teltonika-ingest``, shared by every instance)
  and this instance's ``commands:wake:{id}`` in one blocking ``XREADGROUP`` on a connection
  of its own. Queue entries are checked and stored (``ACCEPT``) or cancel (``CANCEL``) one at
  a time on that same connection, so one device's commands keep their order. Entries another
  consumer read and never handled (it died) are taken over with ``XAUTOCLAIM``.
* **Deliver**: when a device's handshake is accepted here (after its registry write), when a
  wake names a device held here, and when the previous queued command of a connection is
  settled, ``CLAIM`` takes the head of that device's queue; the session writes it when idle
  (after the ACK of the packet in hand). One queued command per connection at a time.
* **Settle**: the answer (``ok`` / ``nack``), no answer in time or the connection closing
  (``unanswered``: failed after ``max_attempts``, else put back) and a claim never written
  (``unsent``: put back, not counted) are each one ``SETTLE``, fenced by instance and attempt.
  Writes that fail are retried with backoff; an answer is never dropped while this process
  lives.
* **Sweep** ``commands:expiry`` every ``sweep_interval``: TTLs and delivery leases that are due.
  Cost: one script per page of due commands, nothing per queued command.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec import TYPE_NACK, CommandMessage, encode_command, format_timestamp
from teltonika_ingest.redis.client import RedisClient, RedisError, RedisReplyError, Script
from teltonika_ingest.server.commands.entries import GROUP, RESULTS_MAXLEN, InvalidCommand
from teltonika_ingest.server.commands.queue import (
    ACCEPT,
    CANCEL,
    CLAIM,
    QUEUE_KEY,
    SETTLE,
    SWEEP,
    WRITTEN,
    CancelRequest,
    cancel_args,
    parse_queue_entry,
    wake_stream,
)
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.session import PendingCommand

if TYPE_CHECKING:
    from teltonika_ingest.redis.client import RedisTargetLike
    from teltonika_ingest.server.protocol import TeltonikaFactory, TeltonikaProtocol

__all__ = ["QueueSettings", "QueuedCommands"]

log = Logger()


@attrs.frozen
class QueueSettings:
    default_ttl: float = 86400.0
    default_attempts: int = 3
    max_per_device: int = 32
    max_total: int = 500_000
    sweep_interval: float = 5.0
    #: a delivery's lease: its timeout plus this (the delivering instance settles it itself
    #: at its timeout; the lease only covers an instance that died or lost Redis)
    lease_grace: float = 30.0
    #: a commands:queue entry read by a consumer and not handled for this long is taken over
    claim_idle: float = 60.0
    #: a device that connects here while its head command is being delivered elsewhere (or
    #: on its previous connection here) waits this long before taking that delivery over:
    #: the other side may be recording the answer that arrived just before the device moved
    takeover_grace: float = 2.0
    default_timeout: float = 30.0
    max_command_length: int = 512
    results_maxlen: int = RESULTS_MAXLEN
    #: most bytes of commands:results (0: entries only), as ``--results-max-bytes``
    results_max_bytes: int = 0
    block_seconds: float = 2.0
    batch_size: int = 100
    sweep_page: int = 200
    #: pages per sweep tick at most (the next tick goes on)
    sweep_pages: int = 10

    @property
    def results_limits(self) -> str:
        """The scripts' results bound: ``MAXLEN`` and, if set, bytes."""
        if self.results_max_bytes:
            return f"{self.results_maxlen}:{self.results_max_bytes}"
        return str(self.results_maxlen)


@attrs.define(eq=False)
class _Delivery:
    """One delivery attempt of a queued command on one connection (the session's handle)."""

    sink: QueuedCommands
    id: str
    imei: str
    attempt: int
    binary: bool
    timeout: float
    protocol: TeltonikaProtocol
    queued_for: float  # seconds from queued to claimed (Redis clock)
    claimed_at: float  # local clock
    pending: PendingCommand | None = None
    sent_at: float | None = None
    timer: Any = None
    done: bool = False


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _is_printable(payload: bytes) -> bool:
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(" " <= c <= "~" or c in "\r\n\t" for c in text)


class QueuedCommands(Service):
    """Delivers queued commands to the devices this instance holds (``factory.queue``).

    ``writer`` is the service's shared client (claims, settles, sweeps); the blocking reads
    and the accepts run on a client of its own built from ``target`` (or ``reader``).
    """

    name = "command-queue"
    retry_min = 0.2
    retry_max = 30.0

    def __init__(
        self,
        factory: TeltonikaFactory,
        *,
        instance_id: str,
        writer: Any,
        target: RedisTargetLike | None = None,
        reader: Any = None,
        reactor: Any = None,
        clock: Any = None,
        metrics: Metrics | None = None,
        settings: QueueSettings | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings = settings if settings is not None else QueueSettings()
        if reader is None:
            if target is None:
                raise ValueError("QueuedCommands needs a Redis target (or a reader client)")
            reader = RedisClient(
                target,
                reactor=reactor,
                command_timeout=settings.block_seconds + 5,
                poolsize=1,
                name="redis-command-queue",
            )
        self.factory = factory
        self.instance_id = instance_id
        self.wake_key = wake_stream(instance_id)
        self.reader = reader
        self.writer = writer
        self.clock: Any = clock if clock is not None else reactor
        self.metrics = metrics if metrics is not None else factory.metrics
        self._active: dict[TeltonikaProtocol, _Delivery] = {}
        self._claiming: set[TeltonikaProtocol] = set()
        #: delay before the next claim of a connection whose claim failed (Redis away)
        self._claim_backoff: dict[TeltonikaProtocol, float] = {}
        self._again: set[TeltonikaProtocol] = set()
        self._writes = 0  # script calls not yet answered (and their retries)
        self._drain_waiters: list[defer.Deferred[None]] = []
        self._retries: set[Any] = set()
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeping: defer.Deferred[Any] | None = None
        self._loop: defer.Deferred[None] | None = None
        self._sleep_call: Any = None
        self._sleep_d: defer.Deferred[None] | None = None
        self._next_autoclaim = 0.0
        self._stopping = False
        self._closed = False
        self._trouble: str | None = None
        self.claims_answered = 0
        factory.queue = self

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self._stopping = self._closed = False
        if not self.reader.running:
            self.reader.startService()
        self.reader.connection_made_hooks.append(self._wake_loop)
        self._loop = defer.ensureDeferred(self._consume())
        self._loop.addErrback(lambda f: log.failure("command queue reader stopped", failure=f))
        self._sweeper.start(self.settings.sweep_interval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        """Stop reading and claiming. Deliveries in progress end with their connections
        (then put back in the queue, see ``drain``)."""
        super().stopService()
        self._stopping = True
        if self._sweeper.running:
            self._sweeper.stop()
        self._wake_loop()
        if self._wake_loop in self.reader.connection_made_hooks:
            self.reader.connection_made_hooks.remove(self._wake_loop)
        waits = [self.reader.stopService() if self.reader.running else defer.succeed(None)]
        if self._loop is not None and not self._loop.called:
            waits.append(self._loop)
        return defer.gatherResults(waits, consumeErrors=True).addBoth(lambda _: None)

    def drain(self, timeout: float = 5.0) -> defer.Deferred[int]:
        """After the device connections closed: wait (at most ``timeout``) for the settles
        they caused; fires with the number left unwritten (their leases run out and the
        sweep puts them back)."""
        done: defer.Deferred[None] = defer.Deferred()
        if self._writes:
            self._drain_waiters.append(done)
            for call in list(self._retries):
                if call.active():
                    call.reset(0)
        else:
            done.callback(None)

        def give_up() -> None:
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(timeout, give_up)

        def finished(_: Any) -> int:
            if timer.active():
                timer.cancel()
            left = self._writes
            self._closed = True
            for call in list(self._retries):
                if call.active():
                    call.cancel()
            self._retries.clear()
            if left:
                log.warn(
                    "command queue closing with {n} settles unwritten; those deliveries are "
                    "put back when their lease runs out",
                    n=left,
                )
            return left

        return done.addCallback(finished)

    @property
    def claims_in_flight(self) -> int:
        """Claims sent and not yet answered (``claims_answered``: those answered so far)."""
        return len(self._claiming)

    # ------------------------------------------------------------------ Redis calls

    def _at(self) -> str:
        return format_timestamp(int(self.clock.seconds() * 1000))

    def _call(
        self,
        script: Script,
        keys: Sequence[Any],
        args: Sequence[Any],
        done: Callable[[Any], Any],
        what: str,
        delay: float | None = None,
    ) -> None:
        """Run a script on the writer until Redis takes it (retried with backoff)."""
        self._writes += 1
        d = self.writer.run_script(script, keys, args)

        def ok(reply: Any) -> None:
            self._write_done()
            done(reply)

        def failed(failure: Failure) -> None:
            self._write_done()
            if self._closed:
                log.warn("dropping {what} at shutdown: {e}", what=what, e=failure.getErrorMessage())
                return
            wait = self.retry_min if delay is None else delay
            log.warn(
                "{what} failed ({error}); retrying in {wait:g} s",
                what=what,
                error=failure.getErrorMessage() or repr(failure.value),
                wait=wait,
            )
            self._writes += 1  # the retry is still owed

            def retry() -> None:
                self._retries.discard(call)
                self._writes -= 1
                if not self._closed:
                    self._call(script, keys, args, done, what, min(wait * 2, self.retry_max))

            call = self.clock.callLater(wait, retry)
            self._retries.add(call)

        d.addCallbacks(ok, failed)
        d.addErrback(lambda f: log.failure("handling the reply of {what}", failure=f, what=what))

    def _write_done(self) -> None:
        self._writes -= 1
        if not self._writes:
            waiters, self._drain_waiters = self._drain_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)

    # ------------------------------------------------------------------ delivery

    def device_accepted(self, proto: TeltonikaProtocol) -> None:
        """A handshake was accepted here and registered: deliver what waits for it."""
        self.pump(proto)

    def pump(self, proto: TeltonikaProtocol, force: bool = False) -> None:
        """Claim the head of this connection's device queue, unless one is in progress.
        ``force``: take over a delivery still open elsewhere (after ``takeover_grace``)."""
        imei = proto.imei
        if self._stopping or imei is None or self.factory.by_imei.get(imei) is not proto:
            self._claim_backoff.pop(proto, None)
            return
        if proto in self._active:
            return
        if proto in self._claiming:
            self._again.add(proto)
            return
        self._claiming.add(proto)
        s = self.settings
        d = self.writer.run_script(
            CLAIM,
            [],
            [
                imei, self.instance_id, s.results_limits, self._at(), int(s.lease_grace * 1000),
                "1" if force else "",
            ],
        )  # fmt: skip
        d.addCallbacks(self._claimed, self._claim_failed, (proto,), None, (proto,))
        d.addErrback(lambda f: log.failure("claiming a queued command for {imei}", f, imei=imei))

    def _claim_failed(self, failure: Failure, proto: TeltonikaProtocol) -> None:
        self._claiming.discard(proto)
        self._again.discard(proto)
        delay = self._claim_backoff.get(proto)
        # one warning per device and outage (every handshake during a Redis outage fails)
        (log.debug if delay is not None else log.warn)(
            "could not look at the command queue of {imei} ({error}); retrying",
            imei=proto.imei,
            error=failure.getErrorMessage(),
        )
        delay = self.retry_min * 5 if delay is None else min(delay * 2, self.retry_max)
        self._claim_backoff[proto] = delay
        call = self.clock.callLater(delay, self._retry_pump, proto)
        self._retries.add(call)

    def _retry_pump(self, proto: TeltonikaProtocol, force: bool = False) -> None:
        for call in list(self._retries):
            if not call.active():
                self._retries.discard(call)
        self.pump(proto, force)

    def _count_settled(self, imei: str, settled: str) -> None:
        for status in filter(None, settled.split(",")):
            self.metrics.commands.labels(status=status).inc()
            log.warn("queued command for {imei} {status} at delivery", imei=imei, status=status)

    def _claimed(self, reply: Any, proto: TeltonikaProtocol) -> None:
        self.claims_answered += 1
        self._claiming.discard(proto)
        self._claim_backoff.pop(proto, None)
        again = proto in self._again
        self._again.discard(proto)
        reply = [_text(v) if v is not None else "" for v in reply]
        status = reply[0]
        imei = proto.imei or ""
        if status == "elsewhere":
            log.info(
                "not delivering queued commands to {imei} here: the registry names {holder}",
                imei=imei,
                holder=reply[1],
            )
            return
        if status == "busy":
            log.info(
                "queued command for {imei} is being delivered by {holder}; taking it over in "
                "{grace:g} s unless that delivery ends first",
                imei=imei,
                holder=reply[1],
                grace=self.settings.takeover_grace,
            )
            call = self.clock.callLater(self.settings.takeover_grace, self._retry_pump, proto, True)
            self._retries.add(call)
            return
        self._count_settled(imei, reply[1])
        if status != "deliver":
            if again:
                self.pump(proto)
            return
        (cid, kind, payload, codec, timeout_ms, attempt, max_attempts, enqueued, now, previous) = (
            reply[2:12]
        )
        data = binascii.unhexlify(payload) if kind == "hex" else payload.encode("ascii")
        delivery = _Delivery(
            sink=self,
            id=cid,
            imei=imei,
            attempt=int(attempt),
            binary=kind == "hex",
            timeout=int(timeout_ms) / 1000,
            protocol=proto,
            queued_for=max(0.0, (int(now) - int(enqueued)) / 1000),
            claimed_at=self.clock.seconds(),
        )
        frame = encode_command(data, codec=codec, imei=imei if codec == "14" else None)
        delivery.pending = PendingCommand(frame, handle=delivery)
        self._active[proto] = delivery
        log.info(
            "queued command {id} for {imei}: delivery {attempt} of {max}{taken}",
            id=cid,
            imei=imei,
            attempt=attempt,
            max=max_attempts,
            taken=f" (taken over from {previous})" if previous else "",
        )
        if self._stopping or self.factory.by_imei.get(imei) is not proto:
            self.abandoned((delivery,))
            return
        proto.send_command(delivery.pending)

    # ------------------------------------------------------------------ CommandSink

    def sent(self, handle: Any, protocol: TeltonikaProtocol) -> None:
        if not isinstance(handle, _Delivery) or handle.done:
            return
        now = self.clock.seconds()
        handle.sent_at = now
        self.metrics.commands_inflight.inc()
        self.metrics.queue_delivered.inc()
        self.metrics.queue_delay.observe(handle.queued_for + (now - handle.claimed_at))
        handle.timer = self.clock.callLater(handle.timeout, self._timed_out, handle)
        s = self.settings
        d = self.writer.run_script(
            WRITTEN, [], [handle.id, self.instance_id, handle.attempt, int(s.lease_grace * 1000)]
        )
        d.addErrback(
            lambda f: log.warn(
                "could not extend the delivery lease of {id}: {e}",
                id=handle.id,
                e=f.getErrorMessage(),
            )
        )

    def answered(self, handle: Any, message: CommandMessage) -> None:
        if not isinstance(handle, _Delivery) or handle.done:
            log.warn(
                "answer for a queued command no longer awaited: {text!r}", text=message.text[:200]
            )
            return
        self._end(handle)
        if handle.sent_at is not None:
            self.metrics.command_roundtrip.observe(self.clock.seconds() - handle.sent_at)
        extra: list[str] = []
        if message.type == TYPE_NACK:
            status = "nack"
            response = (
                f"the device refused the Codec 14 command: IMEI mismatch (it answered for "
                f"{message.imei})"
            )
        else:
            status, response = "ok", message.text
            if handle.binary or not _is_printable(message.payload):
                extra = ["response_b64", base64.b64encode(message.payload).decode("ascii")]
        self._settle(handle, "answer", status, response, extra)

    def abandoned(self, handles: tuple[Any, ...]) -> None:
        for handle in handles:
            if not isinstance(handle, _Delivery) or handle.done:
                continue
            written = handle.sent_at is not None
            self._end(handle)
            if written:
                self._settle(handle, "unanswered", "", "the connection closed before the answer")
            else:
                self._settle(handle, "unsent", "", "the connection closed before it was written")

    def device_message(self, imei: str, message: CommandMessage, unsolicited: bool) -> None:
        """Device messages are the router's (never routed here)."""

    def _timed_out(self, handle: _Delivery) -> None:
        handle.timer = None
        if handle.done:
            return
        self._end(handle)
        if handle.pending is not None:
            handle.protocol.command_timed_out(handle.pending)
        self._settle(handle, "unanswered", "", f"no answer within {handle.timeout:g} s")

    def _end(self, handle: _Delivery) -> None:
        handle.done = True
        if handle.timer is not None and handle.timer.active():
            handle.timer.cancel()
        handle.timer = None
        if handle.sent_at is not None:
            self.metrics.commands_inflight.dec()
        # it stays in _active until its settle is answered: a claim before that would find
        # this delivery still open in Redis and take it over

    def _settle(
        self, handle: _Delivery, how: str, status: str, response: str, extra: Sequence[str] = ()
    ) -> None:
        s = self.settings
        args = [
            handle.id, self.instance_id, handle.attempt, s.results_limits, self._at(),
            how, status, response, *extra,
        ]  # fmt: skip

        def settled(reply: Any) -> None:
            if self._active.get(handle.protocol) is handle:
                del self._active[handle.protocol]
            result = _text(reply[0])
            if result in ("ok", "nack", "failed", "expired"):
                self.metrics.commands.labels(status=result).inc()
                level = log.info if result == "ok" else log.warn
                level(
                    "command outcome {status} for queued {id} ({imei}, delivery {attempt}): "
                    "{response}",
                    status=result,
                    id=handle.id,
                    imei=handle.imei,
                    attempt=handle.attempt,
                    response=response[:200],
                )
            elif result == "requeued":
                log.info(
                    "queued command {id} for {imei} back in its queue: {why}",
                    id=handle.id,
                    imei=handle.imei,
                    why=response,
                )
            else:
                log.warn(
                    "{how} of queued command {id} (delivery {attempt}) not recorded: that "
                    "delivery was already ended elsewhere (taken over, swept or retried)",
                    how="the answer" if how == "answer" else "the end",
                    id=handle.id,
                    attempt=handle.attempt,
                )
            self.pump(handle.protocol)
            current = self.factory.by_imei.get(handle.imei)
            if current is not None and current is not handle.protocol:
                self.pump(current)  # the device reconnected here: it need not wait

        self._call(SETTLE, [], args, settled, f"settling queued command {handle.id}")

    # ------------------------------------------------------------------ sweep

    def sweep(self) -> defer.Deferred[Any]:
        """One tick: expire what is due, page by page (at most ``sweep_pages``)."""
        if self._sweeping is not None:
            return self._sweeping
        d = defer.ensureDeferred(self._sweep())

        def failed(f: Failure) -> None:
            if f.check(RedisError):
                log.debug("command queue sweep failed: {e}", e=f.getErrorMessage())
            else:
                log.failure("command queue sweep", failure=f)

        def finished(_: Any) -> None:
            self._sweeping = None

        d.addErrback(failed).addBoth(finished)
        self._sweeping = d
        return d

    async def _sweep(self) -> None:
        s = self.settings
        for _ in range(s.sweep_pages):
            reply = await self.writer.run_script(
                SWEEP, [], [s.results_limits, self._at(), s.sweep_page, self.instance_id]
            )
            due, expired, failed, requeued, depth = (int(v) for v in reply)
            self.metrics.queue_depth.set(depth)
            if expired:
                self.metrics.commands.labels(status="expired").inc(expired)
            if failed:
                self.metrics.commands.labels(status="failed").inc(failed)
            if expired or failed or requeued:
                log.info(
                    "command queue sweep: {expired} expired, {failed} failed, {requeued} "
                    "deliveries put back after their lease",
                    expired=expired,
                    failed=failed,
                    requeued=requeued,
                )
            if due < s.sweep_page:
                return

    # ------------------------------------------------------------------ reading

    def _wake_loop(self) -> None:
        call, d = self._sleep_call, self._sleep_d
        self._sleep_call = self._sleep_d = None
        if call is not None and call.active():
            call.cancel()
        if d is not None and not d.called:
            d.callback(None)

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._sleep_d = d
        self._sleep_call = self.clock.callLater(seconds, self._wake_loop)
        return d

    async def _create_groups(self) -> None:
        for key in (QUEUE_KEY, self.wake_key):
            try:
                await self.reader.execute("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM")
            except RedisReplyError as e:
                if e.code != "BUSYGROUP":
                    raise

    async def _consume(self) -> None:
        s = self.settings
        need_groups = True
        scan_pending = True
        delay = self.retry_min
        while not self._stopping:
            try:
                if need_groups:
                    await self._create_groups()
                    need_groups = False
                if scan_pending:
                    # our own entries read before a restart or a lost reply; each handled
                    # entry leaves the pending list, so reading from 0 again moves on
                    reply = await self.reader.execute(
                        "XREADGROUP", "GROUP", GROUP, self.instance_id, "COUNT", s.batch_size,
                        "STREAMS", QUEUE_KEY, self.wake_key, "0", "0",
                    )  # fmt: skip
                    if not await self._handle_reply(reply):
                        scan_pending = False
                    continue
                now = self.clock.seconds()
                if now >= self._next_autoclaim:
                    self._next_autoclaim = now + s.claim_idle / 2
                    await self._autoclaim()
                reply = await self.reader.execute(
                    "XREADGROUP", "GROUP", GROUP, self.instance_id, "COUNT", s.batch_size,
                    "BLOCK", max(1, int(s.block_seconds * 1000)),
                    "STREAMS", QUEUE_KEY, self.wake_key, ">", ">",
                )  # fmt: skip
                await self._handle_reply(reply)
                delay = self.retry_min
                if self._trouble is not None:
                    log.info("command queue readable again")
                    self._trouble = None
            except Exception as e:
                if self._stopping:
                    break
                if isinstance(e, RedisReplyError) and e.code == "NOGROUP":
                    log.warn("command queue group missing; recreating it")
                    need_groups = True
                elif not isinstance(e, RedisError):
                    log.failure("unexpected error reading the command queue")
                elif self._trouble is None and self.reader.connected:
                    log.warn("cannot read the command queue: {e}; retrying", e=str(e))
                    self._trouble = str(e)
                scan_pending = True
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def _autoclaim(self) -> None:
        """Take over entries another consumer read and never handled (it died)."""
        reply = await self.reader.execute(
            "XAUTOCLAIM", QUEUE_KEY, GROUP, self.instance_id,
            int(self.settings.claim_idle * 1000), "0-0", "COUNT", self.settings.batch_size,
        )  # fmt: skip
        entries = [e for e in (reply[1] or ()) if e]
        if entries:
            log.warn(
                "took over {n} command queue entries left unhandled by another instance",
                n=len(entries),
            )
            await self._handle_reply([[QUEUE_KEY, entries]])

    async def _handle_reply(self, reply: Any) -> bool:
        """Handle an XREADGROUP reply; True if it had entries."""
        any_entries = False
        for stream, entries in reply or ():
            if not entries:
                continue
            any_entries = True
            if _text(stream) == self.wake_key:
                await self._woken(entries)
                continue
            for entry in entries:
                if self._stopping:
                    return any_entries
                await self._entry(_text(entry[0]), entry[1])
        return any_entries

    async def _woken(self, entries: list[Any]) -> None:
        ids = [_text(e[0]) for e in entries]
        await self.reader.execute("XACK", self.wake_key, GROUP, *ids)
        for _id, fields in entries:
            flat = [_text(v) for v in fields or ()]
            imei = dict(zip(flat[0::2], flat[1::2], strict=False)).get("imei")
            proto = self.factory.by_imei.get(imei) if imei else None
            if proto is not None:
                self.pump(proto)

    async def _entry(self, entry_id: str, fields: Sequence[Any] | None) -> None:
        s = self.settings
        at = self._at()
        try:
            parsed = parse_queue_entry(
                fields,
                max_length=s.max_command_length,
                default_timeout=s.default_timeout,
                default_ttl=s.default_ttl,
                default_attempts=s.default_attempts,
            )
        except InvalidCommand as e:
            reason = f"invalid command entry: {e}"
            reply = await self.reader.run_script(
                ACCEPT,
                [QUEUE_KEY],
                [GROUP, entry_id, s.results_limits, at, self.instance_id, e.id, e.imei, reason]
                + [0] * 8,
            )
            self._accepted(entry_id, e.id, e.imei, reply)
            return
        if isinstance(parsed, CancelRequest):
            keys, args = cancel_args(
                parsed.id, self.instance_id, at, results_maxlen=s.results_limits,
                group=GROUP, entry=entry_id,
            )  # fmt: skip
            reply = [_text(v) for v in await self.reader.run_script(CANCEL, keys, args)]
            if reply[0] == "cancelled":
                self.metrics.commands.labels(status="cancelled").inc()
                log.info("queued command {id} ({imei}) cancelled", id=parsed.id, imei=reply[2])
            elif reply[0] == "delivering":
                log.warn(
                    "cancel of {id} refused: instance {instance} is delivering it (attempt "
                    "{attempt}); it gets its own outcome",
                    id=parsed.id,
                    instance=reply[1],
                    attempt=reply[2],
                )
            else:
                log.info(
                    "cancel of {id}: no such queued command (unknown or finished)", id=parsed.id
                )
            return
        request = parsed.request
        args = [
            GROUP, entry_id, s.results_limits, at, self.instance_id, request.id,
            request.imei, "", s.max_per_device, s.max_total, parsed.kind,
            parsed.payload_text, request.codec, int(request.timeout * 1000),
            int(parsed.ttl * 1000), parsed.max_attempts,
        ]  # fmt: skip
        try:
            reply = await self.reader.run_script(ACCEPT, [QUEUE_KEY], args)
        except RedisReplyError as e:
            if e.code in ("NOGROUP", "NOSCRIPT", "LOADING", "BUSY", "OOM", "READONLY"):
                raise  # Redis's state, not this entry's: read it again later
            # Redis refused to store this entry (e.g. a key of the wrong type in its way):
            # refuse it with the reason rather than retry it for ever and block the queue
            log.error(
                "storing queued command {id} for {imei} failed: {error}; refusing it",
                id=request.id,
                imei=request.imei,
                error=str(e),
            )
            args[7] = f"Redis refused to store the command: {str(e)[:200]}"
            reply = await self.reader.run_script(ACCEPT, [QUEUE_KEY], args)
        self._accepted(entry_id, request.id, request.imei, reply)

    def _accepted(self, entry_id: str, cid: str, imei: str, reply: Any) -> None:
        reply = [_text(v) for v in reply]
        if reply[0] == "duplicate":
            log.info("command queue entry {entry} was already handled", entry=entry_id)
        elif reply[0] == "expired":
            self.metrics.commands.labels(status="expired").inc()
            log.warn(
                "command outcome expired for {id} ({imei}, queue entry {entry}): older than "
                "its TTL when read",
                id=cid,
                imei=imei,
                entry=entry_id,
            )
        elif reply[0] == "invalid":
            self.metrics.commands.labels(status="invalid").inc()
            log.warn(
                "command outcome invalid for {id} ({imei}, queue entry {entry}): {reason}",
                id=cid or "-",
                imei=imei or "-",
                entry=entry_id,
                reason=reply[1],
            )
        else:
            holder = reply[1]
            log.info(
                "queued command {id} for {imei} (entry {entry}, position {pos}; {where})",
                id=cid,
                imei=imei,
                entry=entry_id,
                pos=reply[2],
                where=f"held by {holder}" if holder else "device not connected",
            )
            proto = self.factory.by_imei.get(imei)
            if holder == self.instance_id and proto is not None:
                self.pump(proto)
