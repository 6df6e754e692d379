"""GPRS commands (Codec 12/14) from Redis to devices, and their outcomes back (contract.md §4).

The business plane adds commands to ``commands:instance:{instance_id}``; the
:class:`CommandRouter` of that instance reads them with the consumer group ``teltonika-ingest``
(consumer = instance id), checks each entry, hands valid ones to the session of that IMEI
(one in flight per device, written only while the device is idle: see ``session.py``), and
records **exactly one** outcome per entry in ``commands:results``:

``ok`` (the device answered), ``nack`` (Codec 14 IMEI mismatch), ``timeout``, ``not_connected``,
``invalid``; plus ``message`` entries for what devices send on their own (Codec 13, or a
Codec 12/14 answer arriving when no command is in flight, e.g. after its command timed out).

Exactly one outcome: the router decides it and hands it to the
:class:`~teltonika_ingest.server.commands.outcomes.OutcomeWriter` (the outcome's ``XADD`` and
the entry's ``XACK`` in one Lua script that first checks the entry is still pending, retried
until Redis takes it). The router holds an entry until its outcome is written, so it never
hands the same entry to a device twice. An entry stays pending in the group until its outcome
is written: after a crash or a restart, the instance reads its own pending entries first
(``XREADGROUP ... 0``) and handles them again. The command may then reach the device a
second time (if the first attempt got as far as the socket): delivery to the device is
at-least-once, the recorded outcome exactly-once.

An entry older than its own timeout when the router first sees it (entry id time vs. now) gets
``timeout`` without being sent: a stale ``setdigout 1`` must not fire hours later.

Two Redis connections: a private one (``poolsize=1``) for the blocking ``XREADGROUP ... BLOCK``
(a blocking read would stall everything queued behind it on a shared connection) and the
service's shared client for outcome writes (so outcomes are not queued behind a blocked read).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from teltonika_ingest.codec import TYPE_NACK, CommandMessage, encode_command
from teltonika_ingest.redis.client import (
    RedisClient,
    RedisError,
    RedisReplyError,
    RedisTargetLike,
)
from teltonika_ingest.server.commands.entries import (
    GROUP,
    RESULTS_MAXLEN,
    CommandRequest,
    InvalidCommand,
    command_stream,
    entry_time_ms,
    parse_entry,
)
from teltonika_ingest.server.commands.outcomes import Outcome, OutcomeWriter
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.session import PendingCommand

if TYPE_CHECKING:
    from teltonika_ingest.server.protocol import TeltonikaFactory, TeltonikaProtocol

__all__ = ["CommandRouter"]

log = Logger()

# --------------------------------------------------------------------------- state


@attrs.define(eq=False)
class _Command:
    """A command accepted by the router and not yet decided (the session's opaque handle)."""

    entry_id: str
    request: CommandRequest
    accepted_at: float
    pending: PendingCommand | None = None
    protocol: TeltonikaProtocol | None = None
    timer: Any = None
    sent_at: float | None = None
    done: bool = False


# --------------------------------------------------------------------------- the router


class CommandRouter(Service):
    """Consumes this instance's command stream and records command outcomes.

    It is the ``CommandSink`` of ``factory`` (it sets ``factory.commands`` to itself).

    * ``target``: where Redis is (``config.RedisTarget``); the router builds its own
      ``RedisClient(poolsize=1)`` from it for the blocking reads (or pass ``reader``).
    * ``writer``: the service's shared ``RedisClient``, used for outcome writes.
    * ``reactor``: used for the reader connection and, unless ``clock`` is given, as the clock
      of command timeouts and retries.

    Shutdown (contract.md §7): ``stopService`` stops taking commands at once (entries not yet
    handed to a device stay pending in the group for the next start); after the device
    connections are closed (commands in flight then get ``not_connected``), ``drain`` writes
    the outcomes still unwritten, waiting at most its timeout, and drops every timer.
    """

    name = "commands"

    #: bounds of the delay between retries of a failed read or outcome write
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
        default_timeout: float = 30.0,
        max_command_length: int = 512,
        block_seconds: float = 2.0,
        batch_size: int = 100,
        results_maxlen: int = RESULTS_MAXLEN,
        results_max_bytes: int = 0,
        max_held: int = 10_000,
        max_messages_unwritten: int = 10_000,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        if reader is None:
            if target is None:
                raise ValueError("CommandRouter needs a Redis target (or a reader client)")
            reader = RedisClient(
                target,
                reactor=reactor,
                command_timeout=block_seconds + 5,
                poolsize=1,
                name="redis-commands",
            )
        self.factory = factory
        self.instance_id = instance_id
        self.stream_key = command_stream(instance_id)
        self.reader = reader
        # IReactorTime (typed Any: mypy cannot check zope interfaces without a plugin)
        self.clock: Any = clock if clock is not None else reactor
        self.metrics = metrics if metrics is not None else factory.metrics
        self.default_timeout = default_timeout
        self.max_command_length = max_command_length
        self.block_ms = max(1, int(block_seconds * 1000))
        self.batch_size = batch_size
        self.max_held = max_held

        #: entry id -> command awaiting its outcome, or outcome awaiting its write
        #: entry id -> command accepted and not yet decided (decided ones the writer holds)
        self._held: dict[str, _Command] = {}
        self.outcomes = OutcomeWriter(
            writer,
            clock=self.clock,
            instance_id=instance_id,
            stream_key=self.stream_key,
            metrics=self.metrics,
            results_maxlen=results_maxlen,
            results_max_bytes=results_max_bytes,
            max_messages_unwritten=max_messages_unwritten,
            on_written=self._outcome_written,
        )
        self._room_waiter: defer.Deferred[None] | None = None
        self._sleep_call: Any = None
        self._sleep_d: defer.Deferred[None] | None = None
        self._loop: defer.Deferred[None] | None = None
        self._stopping = False
        self._closed = False
        self._read_trouble: str | None = None
        self._reader_seen_up = False
        factory.commands = self

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self._stopping = self._closed = False
        if not self.reader.running:
            self.reader.startService()
        self.reader.connection_made_hooks.append(self._reader_up)
        self._loop = defer.ensureDeferred(self._consume())
        self._loop.addErrback(lambda f: log.failure("command reader stopped", failure=f))

    def stopService(self) -> defer.Deferred[None]:
        """Stop taking commands. Entries read but not yet handed to a device stay pending
        in the group; commands queued or in flight on a connection keep going until it
        closes. Fires once the reader has stopped (its connection is closed at once: a
        blocked read's entries, if any, stay pending too)."""
        super().stopService()
        self._stopping = True
        self._wake()
        if self._room_waiter is not None and not self._room_waiter.called:
            self._room_waiter.callback(None)
        if self._reader_up in self.reader.connection_made_hooks:
            self.reader.connection_made_hooks.remove(self._reader_up)
        stopped = self.reader.stopService() if self.reader.running else defer.succeed(None)
        waits = [stopped]
        if self._loop is not None and not self._loop.called:
            waits.append(self._loop)
        return defer.gatherResults(waits, consumeErrors=True).addBoth(lambda _: None)

    def drain(self, timeout: float = 5.0) -> defer.Deferred[int]:
        """Shutdown, after the device connections closed and before Redis closes: wait (at
        most ``timeout``) until every decided outcome is written, then drop all timers.
        Fires with the number of outcomes left unwritten (their entries stay pending)."""
        done = self.outcomes.flush()

        def give_up() -> None:
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(timeout, give_up)

        def finished(_: Any) -> int:
            if timer.active():
                timer.cancel()
            return self._close()

        return done.addCallback(finished)

    def _close(self) -> int:
        self._closed = True
        unwritten = self.outcomes.close()
        left_pending = 0
        for held in list(self._held.values()):
            if not held.done:
                held.done = True
                self._cancel_timer(held)
                if held.sent_at is not None:
                    self.metrics.commands_inflight.dec()
                left_pending += 1
        if unwritten or left_pending:
            log.warn(
                "command router closing with {unwritten} outcomes unwritten and {left} commands "
                "undecided; their entries stay pending in {stream} for the next start",
                unwritten=unwritten,
                left=left_pending,
                stream=self.stream_key,
            )
        self._held.clear()
        return unwritten

    @property
    def held(self) -> int:
        """Commands accepted and not yet recorded (decided or not)."""
        return len(self._held) + self.outcomes.unwritten_entries

    def _holds(self, entry_id: str) -> bool:
        return entry_id in self._held or self.outcomes.holds(entry_id)

    @property
    def unwritten(self) -> int:
        return self.outcomes.unwritten

    # ------------------------------------------------------------------ reading

    def _reader_up(self) -> None:
        self._reader_seen_up = True
        self._wake()

    def _wake(self) -> None:
        call, d = self._sleep_call, self._sleep_d
        self._sleep_call = self._sleep_d = None
        if call is not None and call.active():
            call.cancel()
        if d is not None and not d.called:
            d.callback(None)

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._sleep_d = d
        self._sleep_call = self.clock.callLater(seconds, self._wake)
        return d

    def _room(self) -> defer.Deferred[None] | None:
        """A Deferred to wait on while too many commands are held in memory."""
        if self.held < self.max_held:
            return None
        self._room_waiter = defer.Deferred()
        return self._room_waiter

    async def _consume(self) -> None:
        need_group = True
        scan_pending = True  # read our own pending entries before new ones
        pending_from = "0"
        delay = self.retry_min
        while not self._stopping:
            try:
                if need_group:
                    await self._create_group()
                    need_group = False
                if scan_pending:
                    reply = await self.reader.execute(
                        "XREADGROUP", "GROUP", GROUP, self.instance_id,
                        "COUNT", self.batch_size, "STREAMS", self.stream_key, pending_from,
                    )  # fmt: skip
                    entries = _entries(reply)
                    if not entries:
                        scan_pending, pending_from = False, "0"
                        continue
                    for entry_id, fields in entries:
                        pending_from = entry_id
                        if self._stopping:
                            break
                        self.handle_entry(entry_id, fields, redelivered=True)
                    continue
                room = self._room()
                if room is not None:
                    await room
                    continue
                reply = await self.reader.execute(
                    "XREADGROUP", "GROUP", GROUP, self.instance_id,
                    "COUNT", self.batch_size, "BLOCK", self.block_ms,
                    "STREAMS", self.stream_key, ">",
                )  # fmt: skip
                for entry_id, fields in _entries(reply):
                    if self._stopping:
                        break  # read but not handled: stays pending for the next start
                    self.handle_entry(entry_id, fields)
                delay = self.retry_min
                if self._read_trouble is not None:
                    log.info("command stream {stream} readable again", stream=self.stream_key)
                    self._read_trouble = None
            except RedisReplyError as e:
                if self._stopping:
                    break
                if e.code == "NOGROUP":
                    # The stream or its group was deleted (or Redis lost its data): recreate
                    # it and look at our pending entries again.
                    log.warn(
                        "command group {group} missing on {stream}; recreating it",
                        group=GROUP,
                        stream=self.stream_key,
                    )
                    need_group = scan_pending = True
                    pending_from = "0"
                else:
                    self._read_failed(str(e))
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max)
            except RedisError as e:
                if self._stopping:
                    break
                # The reply of a read may have been lost with the connection: its entries
                # are in our pending list, so read that again once Redis is back.
                scan_pending, pending_from = True, "0"
                self._read_failed(str(e) or type(e).__name__)
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max)
            except Exception:
                if self._stopping:
                    break
                log.failure(
                    "unexpected error reading commands from {stream}", stream=self.stream_key
                )
                scan_pending, pending_from = True, "0"
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def _create_group(self) -> None:
        try:
            await self.reader.execute("XGROUP", "CREATE", self.stream_key, GROUP, "0", "MKSTREAM")
            log.info(
                "created consumer group {group} on {stream}", group=GROUP, stream=self.stream_key
            )
        except RedisReplyError as e:
            if e.code != "BUSYGROUP":
                raise

    def _read_failed(self, reason: str) -> None:
        if not self._reader_seen_up:
            log.debug("command reader not connected yet: {reason}", reason=reason)
            return  # still connecting at start-up: not worth a warning
        if self._read_trouble is None:
            log.warn(
                "cannot read commands from {stream}: {reason}; retrying",
                stream=self.stream_key,
                reason=reason,
            )
        self._read_trouble = reason

    # ------------------------------------------------------------------ entries

    def handle_entry(
        self, entry_id: str, fields: Sequence[Any] | None, redelivered: bool = False
    ) -> None:
        """Handle one entry of the command stream (what the reader does for each)."""
        if self._holds(entry_id):
            return  # read again (our pending entries) while still held: handed off once
        self._handle(entry_id, fields, redelivered)

    def _handle(
        self, entry_id: str, fields: Sequence[Any] | None, redelivered: bool = False
    ) -> None:
        try:
            self._accept(entry_id, fields, redelivered)
        except Exception as e:
            log.failure("unexpected error handling command entry {entry}", entry=entry_id)
            if not self._holds(entry_id):
                self._record(entry_id, "", "", "invalid", f"internal error handling the entry: {e}")

    def _accept(self, entry_id: str, fields: Sequence[Any] | None, redelivered: bool) -> None:
        try:
            request = parse_entry(
                fields, max_length=self.max_command_length, default_timeout=self.default_timeout
            )
        except InvalidCommand as e:
            log.warn(
                "invalid command entry {entry} in {stream}: {reason}",
                entry=entry_id,
                stream=self.stream_key,
                reason=str(e),
            )
            self._record(entry_id, e.id, e.imei, "invalid", f"invalid command entry: {e}")
            return
        now = self.clock.seconds()
        added_ms = entry_time_ms(entry_id)
        age = now - added_ms / 1000 if added_ms is not None else 0.0
        if age >= request.timeout:
            self._record(
                entry_id,
                request.id,
                request.imei,
                "timeout",
                f"expired before it was sent: the entry is {age:.0f} s old, past its timeout "
                f"of {request.timeout:g} s",
            )
            return
        protocol = self.factory.by_imei.get(request.imei)
        if protocol is None:
            self._record(
                entry_id,
                request.id,
                request.imei,
                "not_connected",
                f"instance {self.instance_id} holds no connection for this IMEI",
            )
            return
        frame = encode_command(
            request.payload,
            codec=request.codec,
            imei=request.imei if request.codec == "14" else None,
        )
        command = _Command(entry_id, request, now)
        command.pending = PendingCommand(frame, handle=command)
        command.protocol = protocol
        command.timer = self.clock.callLater(request.timeout, self._expired, command)
        self._held[entry_id] = command
        log.info(
            "command {id} ({entry}{again}) for {imei}: {size} bytes, Codec {codec}, "
            "timeout {timeout:g} s",
            id=request.id,
            entry=entry_id,
            again=", read again after a restart" if redelivered else "",
            imei=request.imei,
            size=len(request.payload),
            codec=request.codec,
            timeout=request.timeout,
        )
        protocol.send_command(command.pending)

    # ------------------------------------------------------------------ CommandSink

    def sent(self, handle: Any, protocol: TeltonikaProtocol) -> None:
        if not isinstance(handle, _Command) or handle.done:
            return
        handle.sent_at = self.clock.seconds()
        handle.protocol = protocol
        self.metrics.commands_inflight.inc()
        log.debug("command {id} written to {imei}", id=handle.request.id, imei=handle.request.imei)

    def answered(self, handle: Any, message: CommandMessage) -> None:
        if not isinstance(handle, _Command) or handle.done:
            log.warn("answer for a command no longer awaited: {text!r}", text=message.text[:200])
            return
        if handle.sent_at is not None:
            self.metrics.command_roundtrip.observe(self.clock.seconds() - handle.sent_at)
        if message.type == TYPE_NACK:
            self._finish(
                handle,
                "nack",
                f"the device refused the Codec 14 command: IMEI mismatch (it answered for "
                f"{message.imei})",
            )
        else:
            self._finish(handle, "ok", message.text, payload=message.payload)

    def abandoned(self, handles: tuple[Any, ...]) -> None:
        for handle in handles:
            if not isinstance(handle, _Command) or handle.done:
                continue
            if handle.sent_at is None and self._stopping:
                # Shutting down and the device never got it: leave the entry pending so the
                # next start (or whichever instance then holds the device) carries it out.
                handle.done = True
                self._cancel_timer(handle)
                self._held.pop(handle.entry_id, None)
                log.info(
                    "command {id} for {imei} not sent before shutdown; its entry {entry} stays "
                    "pending for the next start",
                    id=handle.request.id,
                    imei=handle.request.imei,
                    entry=handle.entry_id,
                )
                continue
            self._finish(
                handle,
                "not_connected",
                "the connection closed before the device answered"
                if handle.sent_at is not None
                else "the connection closed before the command could be sent",
            )

    def device_message(self, imei: str, message: CommandMessage, unsolicited: bool) -> None:
        """A Codec 13 message, or a Codec 12/14 frame with no command in flight."""
        if self._closed:
            return
        self.outcomes.message(imei, message)

    # ------------------------------------------------------------------ outcomes

    def _expired(self, command: _Command) -> None:
        command.timer = None
        if command.done:
            return
        protocol = command.protocol
        if command.sent_at is not None and protocol is not None:
            # The session will write its next queued command as soon as it hears of this
            # timeout: first expire the queued ones that are due now too (accepted in the
            # same instant), so that none is written only to expire at once.
            now = self.clock.seconds()
            for other in list(self._held.values()):
                if (
                    other is not command
                    and not other.done
                    and other.protocol is protocol
                    and other.sent_at is None
                    and other.accepted_at + other.request.timeout <= now
                ):
                    self._timeout(other)
        self._timeout(command)

    def _timeout(self, command: _Command) -> None:
        timeout = command.request.timeout
        if command.sent_at is not None:
            response = f"no answer within {timeout:g} s"
        else:
            response = f"not sent within {timeout:g} s: the device was busy the whole time"
        self._finish(command, "timeout", response)
        protocol, pending = command.protocol, command.pending
        if protocol is not None and pending is not None:
            protocol.command_timed_out(pending)  # drop it from the session, send the next

    def _cancel_timer(self, command: _Command) -> None:
        if command.timer is not None and command.timer.active():
            command.timer.cancel()
        command.timer = None

    def _finish(
        self, command: _Command, status: str, response: str, payload: bytes | None = None
    ) -> None:
        command.done = True
        self._cancel_timer(command)
        self._held.pop(command.entry_id, None)  # the writer holds the entry from now on
        if command.sent_at is not None:
            self.metrics.commands_inflight.dec()
        request = command.request
        self._record(
            command.entry_id,
            request.id,
            request.imei,
            status,
            response,
            payload=payload,
            binary=request.binary,
        )

    def _record(
        self,
        entry_id: str,
        cid: str,
        imei: str,
        status: str,
        response: str,
        *,
        payload: bytes | None = None,
        binary: bool = False,
    ) -> None:
        """Hand a decided outcome to the writer (which holds the entry until it is written)."""
        self.outcomes.record(entry_id, cid, imei, status, response, payload=payload, binary=binary)

    def _outcome_written(self, outcome: Outcome) -> None:
        waiter = self._room_waiter
        if waiter is not None and not waiter.called and self.held < self.max_held:
            self._room_waiter = None
            waiter.callback(None)


def _entries(reply: Any) -> list[tuple[str, list[Any] | None]]:
    """``XREADGROUP`` reply -> [(entry id, flat fields or None if the entry was deleted)]."""
    if not reply:
        return []
    out: list[tuple[str, list[Any] | None]] = []
    for _stream, entries in reply:
        for entry in entries or ():
            entry_id = entry[0]
            if isinstance(entry_id, bytes):
                entry_id = entry_id.decode("ascii", "replace")
            out.append((str(entry_id), entry[1]))
    return out
