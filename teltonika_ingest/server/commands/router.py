"""GPRS commands (Codec 12/14) from Redis to devices, and their outcomes back (contract.md §4).

The business plane adds commands to ``commands:instance:{instance_id}``; the
:class:`CommandRouter` of that instance reads them with the consumer group ``teltonika-ingest``
(consumer = instance id), checks each entry, hands valid ones to the session of that IMEI
(one in flight per device, written only while the device is idle: see ``session.py``), and
records **exactly one** outcome per entry in ``commands:results``:

``ok`` (the device answered), ``nack`` (Codec 14 IMEI mismatch), ``timeout``, ``not_connected``,
``invalid``; plus ``message`` entries for what devices send on their own (Codec 13, or a
Codec 12/14 answer arriving when no command is in flight, e.g. after its command timed out).

Exactly one outcome: the outcome's ``XADD`` and the entry's ``XACK`` run in one Lua script
(:data:`RECORD_OUTCOME`), which first checks that the entry is still pending in the group: a
retry after a lost reply never writes a second outcome, and an entry whose outcome was written
is never read again. An entry stays pending until its outcome is written: after a crash or a
restart, the instance reads its own pending entries first (``XREADGROUP ... 0``) and handles
them again. The command may then reach the device a second time (if the first attempt got as
far as the socket): delivery to the device is at-least-once, the recorded outcome exactly-once.

An entry older than its own timeout when the router first sees it (entry id time vs. now) gets
``timeout`` without being sent: a stale ``setdigout 1`` must not fire hours later.

Two Redis connections: a private one (``poolsize=1``) for the blocking ``XREADGROUP ... BLOCK``
(a blocking read would stall everything queued behind it on a shared connection) and the
service's shared client for outcome writes (so outcomes are not queued behind a blocked read).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec import (
    TYPE_NACK,
    CommandMessage,
    encode_command,
    format_timestamp,
)
from teltonika_ingest.redis.client import (
    RedisClient,
    RedisError,
    RedisReplyError,
    RedisTargetLike,
    Script,
)
from teltonika_ingest.server.commands.entries import (
    GROUP,
    RESULTS_KEY,
    RESULTS_MAXLEN,
    CommandRequest,
    InvalidCommand,
    command_stream,
    entry_time_ms,
    parse_entry,
)
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.session import PendingCommand

if TYPE_CHECKING:
    from teltonika_ingest.server.protocol import TeltonikaFactory, TeltonikaProtocol

__all__ = ["RECORD_OUTCOME", "CommandRouter"]

log = Logger()

# KEYS[1] results stream, KEYS[2] command stream.
# ARGV[1] results MAXLEN (~), ARGV[2] group, ARGV[3] command entry id ('' for device
# messages), ARGV[4..] the outcome's field/value pairs.
# Returns the new results entry id, or 0 when the entry is no longer pending in the group
# (its outcome was already recorded: this is a retry of a write whose reply was lost).
# If the group or the stream is gone (XPENDING fails), the outcome is written anyway.
RECORD_OUTCOME = Script(
    """
local entry = ARGV[3]
if entry ~= '' then
  local pending = redis.pcall('XPENDING', KEYS[2], ARGV[2], entry, entry, 1)
  if type(pending) == 'table' and pending['err'] == nil and #pending == 0 then
    return 0
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
if entry ~= '' then
  redis.pcall('XACK', KEYS[2], ARGV[2], entry)
end
return id
"""
)


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


@attrs.define(eq=False)
class _Outcome:
    """A decided outcome waiting to be written (kept and retried until Redis takes it)."""

    key: str
    entry_id: str  # "" for device messages
    status: str
    fields: list[str]
    writing: bool = False
    failures: int = 0


def _is_printable_response(payload: bytes) -> bool:
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(" " <= c <= "~" or c in "\r\n\t" for c in text)


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
        self.results_key = RESULTS_KEY
        self.reader = reader
        self.writer = writer
        # IReactorTime (typed Any: mypy cannot check zope interfaces without a plugin)
        self.clock: Any = clock if clock is not None else reactor
        self.metrics = metrics if metrics is not None else factory.metrics
        self.default_timeout = default_timeout
        self.max_command_length = max_command_length
        self.block_ms = max(1, int(block_seconds * 1000))
        self.batch_size = batch_size
        self.results_maxlen = results_maxlen
        self.max_held = max_held
        self.max_messages_unwritten = max_messages_unwritten

        #: entry id -> command awaiting its outcome, or outcome awaiting its write
        self._held: dict[str, _Command | _Outcome] = {}
        #: key -> outcome not yet written (commands by entry id, messages by "msg:N")
        self._outbox: dict[str, _Outcome] = {}
        self._messages_unwritten = 0
        self._message_seq = 0
        self._retry_call: Any = None
        self._retry_delay = self.retry_min
        self._drain_waiters: list[defer.Deferred[None]] = []
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
        done: defer.Deferred[None] = defer.Deferred()
        if self._outbox:
            self._drain_waiters.append(done)
            if self._retry_call is not None and self._retry_call.active():
                self._retry_call.reset(0)  # retry now rather than after the backoff
        else:
            done.callback(None)

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
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        left_pending = 0
        for held in list(self._held.values()):
            if isinstance(held, _Command) and not held.done:
                held.done = True
                self._cancel_timer(held)
                if held.sent_at is not None:
                    self.metrics.commands_inflight.dec()
                left_pending += 1
        unwritten = len(self._outbox)
        if unwritten or left_pending:
            log.warn(
                "command router closing with {unwritten} outcomes unwritten and {left} commands "
                "undecided; their entries stay pending in {stream} for the next start",
                unwritten=unwritten,
                left=left_pending,
                stream=self.stream_key,
            )
        self._held.clear()
        self._outbox.clear()
        return unwritten

    @property
    def held(self) -> int:
        """Commands accepted and not yet recorded (decided or not)."""
        return len(self._held)

    @property
    def unwritten(self) -> int:
        return len(self._outbox)

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
        if len(self._held) < self.max_held:
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
                        if entry_id not in self._held:
                            self._handle(entry_id, fields, redelivered=True)
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
                    self._handle(entry_id, fields)
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

    def handle_entry(self, entry_id: str, fields: Sequence[Any] | None) -> None:
        """Handle one entry of the command stream (what the reader does for each)."""
        if entry_id in self._held:
            return
        self._handle(entry_id, fields)

    def _handle(
        self, entry_id: str, fields: Sequence[Any] | None, redelivered: bool = False
    ) -> None:
        try:
            self._accept(entry_id, fields, redelivered)
        except Exception as e:
            log.failure("unexpected error handling command entry {entry}", entry=entry_id)
            if entry_id not in self._held:
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
        if self._messages_unwritten >= self.max_messages_unwritten:
            log.warn(
                "dropping a Codec {codec} message from {imei}: {n} device messages await Redis",
                codec=message.codec,
                imei=imei,
                n=self._messages_unwritten,
            )
            return
        extra = ["codec", message.codec]
        if message.timestamp_ms is not None:
            extra += ["device_ts", format_timestamp(message.timestamp_ms)]
        self._message_seq += 1
        self._record(
            "",
            "",
            imei,
            "message",
            message.text,
            payload=message.payload,
            extra=extra,
            key=f"msg:{self._message_seq}",
        )

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
                    isinstance(other, _Command)
                    and other is not command
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
        extra: Sequence[str] = (),
        key: str | None = None,
    ) -> None:
        """Decide an outcome: count it, log it, and write it (retrying until Redis takes it)."""
        self.metrics.commands.labels(status=status).inc()
        fields = [
            "id", cid,
            "imei", imei,
            "status", status,
            "response", response,
            "instance_id", self.instance_id,
            "at", format_timestamp(int(self.clock.seconds() * 1000)),
        ]  # fmt: skip
        if payload is not None and (binary or not _is_printable_response(payload)):
            fields += ["response_b64", base64.b64encode(payload).decode("ascii")]
        if entry_id:
            fields += ["entry_id", entry_id]
        fields += extra
        level = log.info if status in ("ok", "message") else log.warn
        level(
            "command outcome {status} for {id} ({imei}, entry {entry}): {response}",
            status=status,
            id=cid or "-",
            imei=imei or "-",
            entry=entry_id or "-",
            response=response[:200],
        )
        if self._closed:
            return
        outcome = _Outcome(key or entry_id, entry_id, status, fields)
        if entry_id:
            self._held[entry_id] = outcome
        else:
            self._messages_unwritten += 1
        self._outbox[outcome.key] = outcome
        self._write(outcome)

    def _write(self, outcome: _Outcome) -> None:
        outcome.writing = True
        try:
            d = self.writer.run_script(
                RECORD_OUTCOME,
                [self.results_key, self.stream_key],
                [self.results_maxlen, GROUP, outcome.entry_id, *outcome.fields],
            )
        except Exception:
            d = defer.fail(Failure())
        d.addCallbacks(self._written, self._write_failed, (outcome,), None, (outcome,))
        d.addErrback(lambda f: log.failure("recording a command outcome", failure=f))

    def _written(self, reply: Any, outcome: _Outcome) -> None:
        outcome.writing = False
        if self._outbox.get(outcome.key) is not outcome:
            return  # closed meanwhile
        del self._outbox[outcome.key]
        if outcome.entry_id:
            if self._held.get(outcome.entry_id) is outcome:
                del self._held[outcome.entry_id]
        else:
            self._messages_unwritten -= 1
        self._retry_delay = self.retry_min
        if reply == 0 or reply == "0":
            log.info(
                "outcome of entry {entry} was already recorded (a retried write); not repeated",
                entry=outcome.entry_id,
            )
        if outcome.failures:
            log.info(
                "recorded the {status} outcome of {entry} after {n} failed attempts",
                status=outcome.status,
                entry=outcome.entry_id or outcome.key,
                n=outcome.failures,
            )
        waiter = self._room_waiter
        if waiter is not None and not waiter.called and len(self._held) < self.max_held:
            self._room_waiter = None
            waiter.callback(None)
        if not self._outbox:
            waiters, self._drain_waiters = self._drain_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)

    def _write_failed(self, failure: Failure, outcome: _Outcome) -> None:
        outcome.writing = False
        if self._outbox.get(outcome.key) is not outcome:
            return
        outcome.failures += 1
        if outcome.failures == 1:
            log.warn(
                "could not record the {status} outcome of {entry} yet ({error}); kept and "
                "retried, the entry stays pending until then",
                status=outcome.status,
                entry=outcome.entry_id or outcome.key,
                error=failure.getErrorMessage() or repr(failure.value),
            )
        if self._retry_call is None or not self._retry_call.active():
            delay = self._retry_delay
            self._retry_delay = min(delay * 2, self.retry_max)
            self._retry_call = self.clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        if self._closed:
            return
        for outcome in list(self._outbox.values()):
            if not outcome.writing:
                self._write(outcome)


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
