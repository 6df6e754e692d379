"""The Twisted face of a device TCP connection: a thin adapter around ``Session``.

``dataReceived`` feeds the session; the session answers with actions; this module carries
them out (write, publish, register, close) and feeds the outcomes back. Where the ACK is
written: ``TeltonikaProtocol._published`` -> ``Session.published`` -> ``Send(ack)``.
"""

from __future__ import annotations

import random
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika_ingest.codec import AvlFrame, CommandMessage
from teltonika_ingest.server.budget import DeviceBudget, RepeatLimiter, suppressed_note
from teltonika_ingest.server.idle import IdleWheel
from teltonika_ingest.server.memory import malloc_trim
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.session import (
    Accepted,
    Action,
    Authorize,
    Close,
    CommandAnswered,
    CommandsAbandoned,
    CommandSent,
    DeadLetter,
    DeviceMessage,
    FrameRejected,
    KeepAliveSeen,
    PendingCommand,
    Publish,
    Send,
    Session,
    State,
)
from teltonika_ingest.writenow import write_now

log = Logger()

#: bytes read from a device socket at a time (Twisted's default), and while the buffer budget
#: is exhausted (a legitimate packet, <= 1,280 bytes, still arrives in one read)
READ_SIZE = 65536
PRESSURE_READ_SIZE = 4096

#: closed connections' buffers (bytes) worth asking glibc to return memory, and how often at most
TRIM_AFTER_BYTES = 8 << 20
TRIM_EVERY_S = 2.0

# How long a closing connection may take to flush its last bytes before it is aborted
# (a device that never reads must not keep a socket and its buffers forever).
CLOSE_GRACE_SECONDS = 10.0


@attrs.frozen
class SessionSettings:
    handshake_timeout: float = 30.0
    idle_timeout: float = 600.0
    max_frame_size: int = 65536
    max_buffer: int = 262144
    max_connections: int = 0  # 0 = unlimited
    #: seconds a frame may take from its first byte to its last; 0 = no deadline
    frame_timeout: float = 0.0
    #: most connections from one source address; 0 = unlimited
    max_connections_per_address: int = 0
    #: device messages (Codec 13, unsolicited answers) per device per minute; 0 = unlimited
    device_message_budget: int = 0
    #: dead letters per device per minute; 0 = unlimited
    dead_letter_budget: int = 0
    #: bytes buffered across all connections before the biggest buffers stop reading; 0 = off
    max_buffered_bytes: int = 0


#: actions that mean a frame (or keep-alive) was read whole: the frame deadline restarts
_FRAME_DONE = frozenset(
    {Publish, DeadLetter, DeviceMessage, CommandAnswered, KeepAliveSeen, FrameRejected}
)


class PacketPublisher(TypingProtocol):
    """What a device connection needs of the publisher (``publisher.Publisher``); test
    fakes implement the same, and type-check against it."""

    #: ``clock.seconds()`` when Redis last answered a publish (``teltonika_reply_to_ack_seconds``)
    replied_at: float

    def publish_frame(
        self, imei: str, frame: AvlFrame, received_ms: int, frame_at: float | None = None
    ) -> defer.Deferred[int]: ...

    def dead_letter(
        self, imei: str, codec: str, reason: str, raw: bytes, received_ms: int
    ) -> defer.Deferred[Any]: ...


class DeviceRegistry(TypingProtocol):
    """Where accepted IMEIs are registered (``registry.Registry``)."""

    def register(self, imei: str) -> Any: ...

    def unregister(self, imei: str) -> Any: ...


class Authority(TypingProtocol):
    """Decides whether an IMEI may connect (allow-list, Luhn, ...)."""

    def check(self, imei: str) -> bool | defer.Deferred[bool]: ...


class CommandSink(TypingProtocol):
    """Where command outcomes and device messages go (the command router)."""

    def sent(self, handle: Any, protocol: TeltonikaProtocol) -> None: ...

    def answered(self, handle: Any, message: CommandMessage) -> None: ...

    def abandoned(self, handles: tuple[Any, ...]) -> None: ...

    def device_message(self, imei: str, message: CommandMessage, unsolicited: bool) -> None: ...


def describe_peer(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(address)


@implementer(IPushProducer)
class TeltonikaProtocol(Protocol):
    factory: TeltonikaFactory

    def __init__(self) -> None:
        self.session: Session | None = None
        self.peer = "?"
        self.imei: str | None = None
        self._handshake_timer: IDelayedCall | None = None
        #: this connection's second in the factory's IdleWheel (None: not watched)
        self._idle_slot: int | None = None
        self._abort_timer: IDelayedCall | None = None
        self._frame_timer: IDelayedCall | None = None
        #: bytes this connection's session buffered, as last counted in the factory's total
        self.buffered = 0
        #: not read from: the global buffer budget (--max-buffered-bytes) is exhausted
        self.memory_paused = False
        #: source address counted against --max-connections-per-address (None: not counted)
        self.host: str | None = None
        self._last_activity = 0.0
        self._frame_received_at = 0.0
        self._closing = False
        self._write_blocked = False

    # ------------------------------------------------------------------ Twisted callbacks

    def connectionMade(self) -> None:
        factory = self.factory
        settings = factory.settings
        assert self.transport is not None
        self.peer = describe_peer(self.transport.getPeer())
        self.session = Session(
            max_frame_size=settings.max_frame_size, max_buffer=settings.max_buffer
        )
        clock = factory.clock
        self._last_activity = clock.seconds()
        self._handshake_timer = clock.callLater(settings.handshake_timeout, self._handshake_expired)
        if settings.idle_timeout > 0:
            self._idle_slot = factory.idle.watch(self, self._last_activity + settings.idle_timeout)
        factory.connection_opened(self)
        log.debug("device connected from {peer}", peer=self.peer)
        # Back-pressure: when our writes to this device (ACKs) pile up because it does not
        # read, the transport pauses us and we stop reading its packets, so nothing more is
        # published or ACKed for it until it reads again: its buffer stays bounded.
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        if factory.draining or factory.reading_paused:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        if factory.memory_pressure:
            self.transport.bufferSize = PRESSURE_READ_SIZE  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None or self._closing:
            return
        if self.imei is None and self.transport is not None:
            # Behind haproxy: the PROXY header has been read by now, so the transport
            # reports the device's real address (connectionMade saw the balancer's).
            self.peer = describe_peer(self.transport.getPeer())
        factory = self.factory
        factory.metrics.bytes_received.inc(len(data))
        self._last_activity = self._frame_received_at = factory.clock.seconds()
        try:
            actions = session.receive(data)
            self._run(actions)
            buffered = session.buffered
            if buffered != self.buffered:
                factory.buffer_changed(self, buffered)
            # the usual read holds whole frames: nothing left over, no deadline to watch
            if (buffered or self._frame_timer is not None) and factory.settings.frame_timeout:
                self._watch_frame(any(type(a) in _FRAME_DONE for a in actions))
        except Exception:
            self._session_error(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._handshake_timer, self._abort_timer, self._frame_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._handshake_timer = self._abort_timer = self._frame_timer = None
        if self._idle_slot is not None:
            self.factory.idle.forget(self, self._idle_slot)
            self._idle_slot = None
        if self.transport is not None and getattr(self.transport, "producer", None) is self:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
        if self.session is not None:
            try:
                self._run(self.session.close("disconnected", reason.getErrorMessage()))
            except Exception:
                self._session_error(Failure())
            # free the buffer now: this object may live on a while (a timer, a publish)
            self.factory.buffer_released(self, self.session.release())
        self.factory.connection_closed(self)

    # ------------------------------------------------------------------ IPushProducer

    # The transport pauses us when the device does not read its ACKs (its write buffer is
    # full); the factory pauses every connection when publishes back up (``reading_paused``)
    # or at shutdown (``draining``). Reading resumes only when none of them holds.

    def pauseProducing(self) -> None:
        self._write_blocked = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self.resume_reading()

    def resume_reading(self) -> None:
        factory = self.factory
        if (
            self.transport is not None
            and not self._closing
            and not self._write_blocked
            and not factory.draining
            and not factory.reading_paused
            and not self.memory_paused
        ):
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        pass

    # ------------------------------------------------------------------ commands (router API)

    def send_command(self, command: PendingCommand) -> None:
        """Queue a GPRS command frame for this device (written when the session is idle)."""
        if self.session is None:
            self.factory.command_sink_abandon((command.handle,))
            return
        self._guarded(self.session.enqueue_command, command)

    def command_timed_out(self, command: PendingCommand) -> None:
        if self.session is not None:
            self._guarded(self.session.command_timed_out, command)

    def close(self, reason: str, detail: str = "") -> None:
        """Close this connection from outside (shutdown, replaced by a newer connection)."""
        if self.session is not None:
            self._guarded(self.session.close, reason, detail)

    # ------------------------------------------------------------------ action interpreter

    def _guarded(self, fn: Any, *args: Any) -> None:
        try:
            self._run(fn(*args))
        except Exception:
            self._session_error(Failure())

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            kind = type(action)
            if kind is Send:
                write_now(self.transport, action.data)  # type: ignore[union-attr]
            elif kind is Publish:
                self._publish(action.frame)  # type: ignore[union-attr]
            elif kind is KeepAliveSeen:
                self.factory.metrics.keepalives.inc()
            elif kind is Authorize:
                self._authorize(action.imei)  # type: ignore[union-attr]
            elif kind is Accepted:
                self._accepted(action.imei)  # type: ignore[union-attr]
            elif kind is Close:
                self._close(action)  # type: ignore[arg-type]
            elif kind is DeadLetter:
                self._dead_letter(action)  # type: ignore[arg-type]
            elif kind is FrameRejected:
                self._frame_rejected(action)  # type: ignore[arg-type]
            elif kind is CommandSent:
                self.factory.command_sink_sent(action.command, self)  # type: ignore[union-attr]
            elif kind is CommandAnswered:
                self.factory.command_sink_answered(action.command, action.message)  # type: ignore[union-attr]
            elif kind is CommandsAbandoned:
                self.factory.command_sink_abandon(action.commands)  # type: ignore[union-attr]
            elif kind is DeviceMessage:
                self._device_message(action)  # type: ignore[arg-type]
            else:  # pragma: no cover
                raise AssertionError(f"unknown action {action!r}")

    # ------------------------------------------------------------------ handshake

    def _authorize(self, imei: str) -> None:
        authority = self.factory.authority
        if authority is None:
            self._run(self._session().authorized(True))
            return
        d = defer.maybeDeferred(authority.check, imei)

        def decided(allowed: bool) -> None:
            session = self._session()
            self._guarded(session.authorized, bool(allowed))
            if session.buffered != self.buffered:
                self.factory.buffer_changed(self, session.buffered)
            self._watch_frame(True)

        def failed(failure: Failure) -> None:
            # The authority could not answer (e.g. Redis down): refuse, the device retries.
            log.warn(
                "authorization of {imei} from {peer} failed: {error}",
                imei=imei,
                peer=self.peer,
                error=failure.getErrorMessage(),
            )
            self._guarded(self._session().authorized, False)

        d.addCallbacks(decided, failed)

    def _accepted(self, imei: str) -> None:
        self.imei = imei
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self.factory.metrics.handshakes.labels(result="accepted").inc()
        log.info("device {imei} connected from {peer}", imei=imei, peer=self.peer)
        self.factory.imei_accepted(self)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        session = self.session
        if session is not None and session.state in (State.AWAITING_IMEI, State.AUTHORIZING):
            self._guarded(session.close, "handshake_timeout", "no IMEI in time")

    def idle_check(self) -> None:
        """The idle deadline passed (``IdleWheel``): close if nothing came since, else watch
        the new deadline."""
        self._idle_slot = None
        now = self.factory.clock.seconds()
        timeout = self.factory.settings.idle_timeout
        idle_for = now - self._last_activity
        session = self.session
        if session is None or session.state is State.CLOSED:
            return
        # A connection waiting on us (publish or authorization in progress) is not idle.
        if idle_for >= timeout and session.state not in (State.PUBLISHING, State.AUTHORIZING):
            self._guarded(session.close, "idle_timeout", f"silent for {idle_for:.0f} s")
            return
        self._idle_slot = self.factory.idle.watch(self, now + max(timeout - idle_for, 1.0))

    def _watch_frame(self, progressed: bool) -> None:
        """The frame deadline (``--frame-timeout``): runs while the session is idle with part
        of a frame buffered, from that frame's first byte; restarts when a frame completes.
        Unlike the idle timer, a byte does not reset it: a peer trickling a frame one byte
        at a time is closed when its frame is late."""
        timeout = self.factory.settings.frame_timeout
        if not timeout:
            return
        session = self.session
        timer = self._frame_timer
        if session is None or session.state is not State.IDLE or not session.buffered:
            if timer is not None:
                if timer.active():
                    timer.cancel()
                self._frame_timer = None
            return
        if timer is None or not timer.active():
            self._frame_timer = self.factory.clock.callLater(timeout, self._frame_expired)
        elif progressed:
            timer.reset(timeout)

    def _frame_expired(self) -> None:
        self._frame_timer = None
        session = self.session
        if session is None or session.state is not State.IDLE or not session.buffered:
            return
        factory = self.factory
        if factory.reading_paused or factory.draining:
            # We are not reading (back-pressure, shutdown): the frame cannot complete
            # through any fault of the device. Look again later.
            self._frame_timer = factory.clock.callLater(
                factory.settings.frame_timeout, self._frame_expired
            )
            return
        self._guarded(
            session.close,
            "frame_timeout",
            f"a frame begun {factory.settings.frame_timeout:g} s ago is incomplete "
            f"({session.buffered} bytes buffered, --frame-timeout)",
        )

    # ------------------------------------------------------------------ publishing

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _publish(self, frame: AvlFrame) -> None:
        factory = self.factory
        codec = frame.codec
        factory.hot_metrics(codec)[0].inc()
        received_at = self._frame_received_at
        imei = self.imei or ""
        d = factory.publisher.publish_frame(
            imei, frame, int(factory.clock.seconds() * 1000), received_at
        )
        # Only what the ACK needs rides along: the decoded records are released as soon as
        # the payloads are built, not held while Redis answers.
        d.addCallbacks(
            self._published,
            self._publish_failed,
            callbackArgs=(codec, frame.record_count, received_at),
        ).addErrback(self._session_error)

    def _published(self, _count: Any, codec: str, records: int, received_at: float) -> None:
        session = self._session()
        if session.state is not State.PUBLISHING:
            return  # connection closed meanwhile: no ACK; the device will resend
        factory = self.factory
        factory.hot_metrics(codec)[1].inc(records)
        self._run(session.published())
        if session.buffered != self.buffered:
            factory.buffer_changed(self, session.buffered)
        now = factory.clock.seconds()
        metrics = factory.metrics
        metrics.ack_latency.observe(now - received_at)
        metrics.reply_to_ack.observe(now - factory.publisher.replied_at)
        if factory.settings.frame_timeout:
            self._watch_frame(True)
        if factory.log_packets:  # per-packet debug costs ~5 % of the hot path: only when asked
            log.debug(
                "ACKed {records} records ({codec}) for {imei}",
                records=records,
                codec=codec,
                imei=self.imei,
            )

    def _publish_failed(self, failure: Failure) -> None:
        # Redis trouble fails every device's publishes at once: a few lines a minute for the
        # whole fleet (by cause, not by device), then one saying how many were suppressed;
        # teltonika_publish_failures_total counts every one
        logged, suppressed = self.factory.log_limit.allow(
            ("publish_failed", type(failure.value).__name__)
        )
        if logged:
            log.error(
                "publish failed for {imei} ({peer}); not ACKed, closing so the device resends: "
                "{error}{suppressed_note}",
                imei=self.imei,
                peer=self.peer,
                error=failure.getErrorMessage() or repr(failure.value),
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )
        self._run(self._session().publish_failed(failure.getErrorMessage()))

    def _dead_letter(self, action: DeadLetter) -> None:
        factory = self.factory
        metrics = factory.metrics
        error = action.error
        if not factory.dead_letter_budget.spend(self.imei):
            # Over budget: not stored, so not ACKed either; close, and the device resends it
            # later (stored then, if its budget allows). A device whose frames we cannot
            # decode cannot fill the dead-letter stream (~98 KiB of Redis memory a frame).
            factory.budget_exceeded("dead_letters", self)
            self._guarded(
                self._session().close,
                "dead_letter_budget",
                f"over --dead-letter-budget {factory.settings.dead_letter_budget} a minute; "
                "not stored, not ACKed",
            )
            return
        if action.reason == "unknown_codec":
            metrics.unknown_codec.inc()
            metrics.frames.labels(codec=action.codec, result="unknown_codec").inc()
        else:
            metrics.frames.labels(codec=action.codec, result="dead_lettered").inc()
        logged, suppressed = factory.log_limit.allow(("dead_letter", self._log_key()))
        if logged:
            log.warn(
                "undecodable frame from {imei} ({peer}), dead-lettering it: {error}"
                "{suppressed_note}",
                imei=self.imei,
                peer=self.peer,
                error=str(error.error),
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )
        assert error.raw is not None
        d = factory.publisher.dead_letter(
            self.imei or "",
            action.codec,
            f"{action.reason}: {error.error}",
            error.raw,
            int(factory.clock.seconds() * 1000),
        )

        def written(_: Any) -> None:
            metrics.dead_letters.labels(reason=action.reason).inc()
            session = self._session()
            if session.state is State.PUBLISHING:
                self._run(session.published())
                if session.buffered != self.buffered:
                    factory.buffer_changed(self, session.buffered)
                self._watch_frame(True)

        d.addCallbacks(written, self._publish_failed)
        d.addErrback(self._session_error)

    def _frame_rejected(self, action: FrameRejected) -> None:
        factory = self.factory
        factory.metrics.frames.labels(codec=action.codec, result=action.result).inc()
        logged, suppressed = factory.log_limit.allow(("bad_frame", self._log_key()))
        if logged:
            log.warn(
                "bad frame from {imei} ({peer}): {detail}; closing{suppressed_note}",
                imei=self.imei or "-",
                peer=self.peer,
                detail=action.detail,
                codec=action.codec,
                result=action.result,
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )

    def _device_message(self, action: DeviceMessage) -> None:
        message = action.message
        factory = self.factory
        if not factory.message_budget.spend(self.imei):
            # Over budget: counted and dropped (the device expects no reply); the connection
            # and its telemetry go on. One device cannot trim the other commands' outcomes
            # out of commands:results.
            factory.budget_exceeded("device_messages", self)
            return
        if action.unsolicited:
            logged, suppressed = factory.log_limit.allow(("unsolicited", self._log_key()))
            if logged:
                log.warn(
                    "Codec {codec} type {type} from {imei} with no command in flight: {text!r}"
                    "{suppressed_note}",
                    codec=message.codec,
                    type=message.type,
                    imei=self.imei,
                    text=message.text[:200],
                    suppressed=suppressed,
                    suppressed_note=suppressed_note(suppressed),
                )
        factory.command_sink_message(self.imei or "", message, action.unsolicited)

    # ------------------------------------------------------------------ closing

    def _close(self, action: Close) -> None:
        if self._closing:
            return
        self._closing = True
        factory = self.factory
        metrics = factory.metrics
        reason = action.reason
        if reason == "handshake_malformed":
            metrics.handshakes.labels(result="malformed").inc()
        elif reason == "handshake_rejected":
            metrics.handshakes.labels(result="rejected").inc()
        elif reason == "handshake_timeout":
            metrics.handshakes.labels(result="timeout").inc()
        metrics.disconnects.labels(reason=reason).inc()
        if reason in ("disconnected", "shutdown", "replaced"):
            log.info(
                "closing connection of {imei} ({peer}): {reason} {detail}",
                imei=self.imei or "-",
                peer=self.peer,
                reason=reason,
                detail=action.detail,
            )
        else:
            # one device or source address failing the same way over and over (a flood)
            # writes a few lines a minute, then one that says how many were suppressed
            # (publish_failed is Redis' doing, not the device's: counted for the fleet)
            key = (
                ("close", reason)
                if reason == "publish_failed"
                else ("close", reason, self._log_key())
            )
            logged, suppressed = factory.log_limit.allow(key)
            if logged:
                log.warn(
                    "closing connection of {imei} ({peer}): {reason} {detail}{suppressed_note}",
                    imei=self.imei or "-",
                    peer=self.peer,
                    reason=reason,
                    detail=action.detail,
                    suppressed=suppressed,
                    suppressed_note=suppressed_note(suppressed),
                )
        transport = self.transport
        if transport is None:
            return
        if action.handshake_reply is not None:
            transport.write(action.handshake_reply)
        if reason == "disconnected":
            return
        transport.loseConnection()
        # A peer that never reads would keep the socket open while our bytes wait.
        self._abort_timer = factory.clock.callLater(
            CLOSE_GRACE_SECONDS,
            transport.abortConnection,  # type: ignore[attr-defined]
        )

    def _log_key(self) -> str:
        """What repeated log lines are counted by: the IMEI, else the source address."""
        if self.imei is not None:
            return self.imei
        return self.peer.rpartition(":")[0] or self.peer

    def _session_error(self, failure: Failure) -> None:
        """An unexpected exception inside this session: log it, close only this session.

        It closes the way every other close does (``Session.close``): its commands get
        ``not_connected`` at once and the disconnect is counted (``session_error``). Only if
        that fails too is the connection aborted on the spot."""
        self.factory.metrics.session_errors.inc()
        log.failure(
            "unexpected error in the session of {imei} ({peer}); closing it",
            failure=failure,
            level=LogLevel.error,
            imei=self.imei or "-",
            peer=self.peer,
        )
        session = self.session
        if session is not None and session.state is not State.CLOSED:
            try:
                self._run(session.close("session_error", failure.getErrorMessage()))
                return
            except Exception:
                log.failure("closing the session of {imei} failed too", imei=self.imei or "-")
        if session is not None:
            session.state = State.CLOSED
        self._closing = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class TeltonikaFactory(Factory):
    """Builds device protocols and tracks every open connection."""

    protocol = TeltonikaProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        *,
        publisher: PacketPublisher,
        registry: DeviceRegistry | None,
        metrics: Metrics,
        clock: IReactorTime,
        settings: SessionSettings | None = None,
        authority: Authority | None = None,
        commands: CommandSink | None = None,
    ) -> None:
        self.publisher = publisher
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.settings = settings or SessionSettings()
        self.authority = authority
        self.commands = commands
        #: queued commands (``commands/delivery.py``); told of every accepted handshake
        self.queue: Any = None
        self.connections: set[TeltonikaProtocol] = set()
        self.by_imei: dict[str, TeltonikaProtocol] = {}
        #: every connection's --idle-timeout deadline, on one timer
        self.idle: IdleWheel[TeltonikaProtocol] = IdleWheel(clock, TeltonikaProtocol.idle_check)
        self.draining = False
        #: reading from every device paused: publishes backed up to --max-inflight
        self.reading_paused = False
        self.read_pauses = 0
        #: log one debug line per ACKed packet (set from --log-level debug)
        self.log_packets = False
        self._hot: dict[str, tuple[Any, Any]] = {}
        #: open connections by source address (only with --max-connections-per-address)
        self._per_host: dict[str, int] = {}
        #: repeated warnings (per event and device or peer) are rate-limited
        self.log_limit = RepeatLimiter(clock)
        #: bytes buffered by all sessions, and the connections paused to keep it bounded
        self.buffered_total = 0
        self._memory_paused: set[TeltonikaProtocol] = set()
        #: over --max-buffered-bytes (until back under three quarters of it)
        self.memory_pressure = False
        self.memory_pauses = 0
        # bytes of closed connections' buffers since glibc was last asked to return memory
        self._released = 0
        self._trim_call: IDelayedCall | None = None
        self._trimmed_at = float("-inf")
        metrics.buffered_bytes.set_function(lambda: self.buffered_total)
        #: per-device budgets (per minute): device messages, dead letters
        self.message_budget = DeviceBudget(clock, self.settings.device_message_budget)
        self.dead_letter_budget = DeviceBudget(clock, self.settings.dead_letter_budget)
        self._empty_waiters: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: IAddress) -> TeltonikaProtocol | None:  # type: ignore[override]
        settings = self.settings
        limit = settings.max_connections
        if limit and len(self.connections) >= limit:
            self._refuse(addr, "max_connections", len(self.connections))
            return None
        host: str | None = None
        per_address = settings.max_connections_per_address
        if per_address:
            host = getattr(addr, "host", None)
            if host is not None:
                count = self._per_host.get(host, 0)
                if count >= per_address:
                    self._refuse(addr, "per_address", count)
                    return None
                # counted at once: connections accepted in one reactor turn count too
                self._per_host[host] = count + 1
        proto = TeltonikaProtocol()
        proto.factory = self
        proto.host = host
        return proto

    def _refuse(self, addr: IAddress, limit: str, count: int) -> None:
        self.metrics.connections_refused.labels(limit=limit).inc()
        host = getattr(addr, "host", None)
        logged, suppressed = self.log_limit.allow(("refused", limit, host))
        if logged:
            option = (
                "--max-connections"
                if limit == "max_connections"
                else ("--max-connections-per-address")
            )
            log.warn(
                "refusing connection from {peer}: {count} connections open ({option})"
                "{suppressed_note}",
                peer=describe_peer(addr),
                count=count,
                option=option,
                limit=limit,
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )

    # ------------------------------------------------------------------ buffer memory

    def buffer_changed(self, proto: TeltonikaProtocol, buffered: int) -> None:
        """``proto``'s session now buffers ``buffered`` bytes: keep the total within the
        global budget (``--max-buffered-bytes``).

        Beyond the budget the service stops reading from the connections holding the
        biggest buffers, until those still read hold at most half of it; from then on,
        until the total is back under three quarters of the budget, every connection is
        read at most ``PRESSURE_READ_SIZE`` bytes at a time and stops being read as soon as
        a read leaves it holding more than before (a partial frame that grows). Devices
        whose frames arrive whole are not slowed down. The kernel keeps the unread bytes
        and the devices wait; a paused connection's frame deadline still runs."""
        delta = buffered - proto.buffered
        proto.buffered = buffered
        total = self.buffered_total = self.buffered_total + delta
        budget = self.settings.max_buffered_bytes
        if not budget:
            return
        if total > budget:
            if not self.memory_pressure:
                self._memory_pressure_on(budget)
            elif delta > 0 and not proto.memory_paused:
                self._memory_pause([proto])
        elif self.memory_pressure and total <= budget * 3 // 4:
            self._memory_pressure_off()

    def _memory_pressure_on(self, budget: int) -> None:
        self.memory_pressure = True
        reading = sorted(
            (p for p in self.connections if p.buffered and not p.memory_paused),
            key=lambda p: p.buffered,
            reverse=True,
        )
        held = sum(p.buffered for p in reading)
        biggest = []
        for p in reading:
            if held <= budget // 2:
                break
            biggest.append(p)
            held -= p.buffered
        for p in self.connections:
            if p.transport is not None:
                p.transport.bufferSize = PRESSURE_READ_SIZE  # type: ignore[attr-defined]
        self._memory_pause(biggest)
        log.warn(
            "{total} bytes buffered, over --max-buffered-bytes {budget}: stopped reading from "
            "the {n} devices with the biggest buffers; devices whose buffers grow stop too",
            total=self.buffered_total,
            budget=budget,
            n=len(biggest),
        )

    def _memory_pause(self, protos: list[TeltonikaProtocol]) -> None:
        for p in protos:
            p.memory_paused = True
            self._memory_paused.add(p)
            if p.transport is not None:
                p.transport.pauseProducing()  # type: ignore[attr-defined]
        if protos:
            self.memory_pauses += len(protos)
            self.metrics.memory_pauses.inc(len(protos))

    def _memory_pressure_off(self) -> None:
        self.memory_pressure = False
        protos, self._memory_paused = self._memory_paused, set()
        log.info(
            "{total} bytes buffered, back under the budget: reading {n} devices again",
            total=self.buffered_total,
            n=len(protos),
        )
        for p in self.connections:
            if p.transport is not None:
                p.transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
        for p in protos:
            p.memory_paused = False
            p.resume_reading()

    def buffer_released(self, proto: TeltonikaProtocol, freed: int) -> None:
        """``proto`` closed and dropped its buffer (``freed`` bytes of it were allocated)."""
        if proto.memory_paused:
            proto.memory_paused = False
            self._memory_paused.discard(proto)
        if proto.buffered:
            self.buffer_changed(proto, 0)
        self._released += freed
        if self._released >= TRIM_AFTER_BYTES and self._trim_call is None:
            # after the burst of closes (a flood ending), and at most every TRIM_EVERY_S
            delay = max(1.0, self._trimmed_at + TRIM_EVERY_S - self.clock.seconds())
            self._trim_call = self.clock.callLater(delay, self._trim)

    def _trim(self) -> None:
        self._trim_call = None
        released, self._released = self._released, 0
        self._trimmed_at = self.clock.seconds()
        returned = malloc_trim()
        log.debug(
            "{released} bytes of closed connections' buffers freed; malloc_trim returned "
            "memory: {returned}",
            released=released,
            returned=returned,
        )

    def budget_exceeded(self, budget: str, proto: TeltonikaProtocol) -> None:
        """A device went over a per-minute budget (``budget``: device_messages,
        dead_letters): count it; log it a few times a minute per device at most."""
        self.metrics.budget_exceeded.labels(budget=budget).inc()
        logged, suppressed = self.log_limit.allow(("budget", budget, proto.imei))
        if logged:
            option = (
                "--device-message-budget"
                if budget == "device_messages"
                else ("--dead-letter-budget")
            )
            log.warn(
                "{imei} ({peer}) is over its {budget} budget ({option}); {what}{suppressed_note}",
                imei=proto.imei,
                peer=proto.peer,
                budget=budget,
                option=option,
                what="message dropped"
                if budget == "device_messages"
                else "frame not stored, connection closed",
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )

    def _release_host(self, proto: TeltonikaProtocol) -> None:
        host, proto.host = proto.host, None
        if host is not None:
            left = self._per_host.get(host, 0) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)

    def hot_metrics(self, codec: str) -> tuple[Any, Any]:
        """(frames_total{codec,ok}, records_total{codec}) children, looked up once per codec:
        ``labels()`` costs more than the increment itself on the per-packet path."""
        pair = self._hot.get(codec)
        if pair is None:
            metrics = self.metrics
            pair = (
                metrics.frames.labels(codec=codec, result="ok"),
                metrics.records.labels(codec=codec),
            )
            self._hot[codec] = pair
        return pair

    # ------------------------------------------------------------------ tracking

    def connection_opened(self, proto: TeltonikaProtocol) -> None:
        self.connections.add(proto)
        self.metrics.connections_total.inc()
        self.metrics.connections_active.set(len(self.connections))

    def connection_closed(self, proto: TeltonikaProtocol) -> None:
        self.connections.discard(proto)
        self._release_host(proto)
        self.metrics.connections_active.set(len(self.connections))
        if not self.connections and self._empty_waiters:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        imei = proto.imei
        if imei is not None and self.by_imei.get(imei) is proto:
            del self.by_imei[imei]
            if self.registry is not None:
                self.registry.unregister(imei)

    def imei_accepted(self, proto: TeltonikaProtocol) -> None:
        imei = proto.imei
        assert imei is not None
        previous = self.by_imei.get(imei)
        self.by_imei[imei] = proto
        if previous is not None and previous is not proto:
            # The device reconnected before its old socket timed out: the old one is stale.
            previous.close("replaced", "the device opened a new connection")
        queue = self.queue
        if self.registry is not None:
            d = self.registry.register(imei)
            if queue is not None:
                # after the registry names us: a command queued from then on wakes us, one
                # queued before is in the queue when we look (no gap between the two)
                def registered(result: Any) -> Any:
                    queue.device_accepted(proto)
                    return result

                defer.maybeDeferred(lambda: d).addBoth(registered)
        elif queue is not None:
            queue.device_accepted(proto)

    # ------------------------------------------------------------------ commands

    # A handle with a ``sink`` (a queued command's delivery) goes there; others to the router.

    def _sink(self, handle: Any) -> CommandSink | None:
        return getattr(handle, "sink", None) or self.commands

    def command_sink_sent(self, handle: Any, proto: TeltonikaProtocol) -> None:
        sink = self._sink(handle)
        if sink is not None:
            sink.sent(handle, proto)

    def command_sink_answered(self, handle: Any, message: CommandMessage) -> None:
        sink = self._sink(handle)
        if sink is not None:
            sink.answered(handle, message)

    def command_sink_abandon(self, handles: tuple[Any, ...]) -> None:
        by_sink: dict[Any, list[Any]] = {}
        for handle in handles:
            by_sink.setdefault(self._sink(handle), []).append(handle)
        for sink, group in by_sink.items():
            if sink is not None:
                sink.abandoned(tuple(group))

    def command_sink_message(self, imei: str, message: CommandMessage, unsolicited: bool) -> None:
        if self.commands is not None:
            self.commands.device_message(imei, message, unsolicited)

    # ------------------------------------------------------------------ shutdown

    def publish_pressure(self, on: bool) -> None:
        """The publisher's back-pressure (``Publisher.pressure_hooks``): stop reading from
        every device while packets wait for an in-flight slot, resume once the backlog is
        gone. Devices keep their data meanwhile (each waits for its ACK), and a paused socket
        holds what it has in the kernel instead of in this process."""
        if on == self.reading_paused:
            return
        self.reading_paused = on
        if on:
            self.read_pauses += 1
            log.debug(
                "publishes backed up to --max-inflight: pausing reads from {n} devices",
                n=len(self.connections),
            )
            for proto in self.connections:
                if proto.transport is not None:
                    proto.transport.pauseProducing()  # type: ignore[attr-defined]
        else:
            log.debug("publish backlog gone: resuming reads")
            # epoll reports the resumed sockets in the order they were resumed, and the first
            # ones fill the in-flight slots again: start at a random place each time, or the
            # same devices would always come last (seconds of ACK latency for them).
            conns = list(self.connections)
            start = random.randrange(len(conns)) if conns else 0
            for proto in conns[start:] + conns[:start]:
                proto.resume_reading()

    def stop_reading(self) -> None:
        """Shutdown step 2: take no new packets (in-flight publishes still finish)."""
        self.draining = True
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.pauseProducing()  # type: ignore[attr-defined]

    def close_all(self, reason: str = "shutdown") -> None:
        for proto in list(self.connections):
            proto.close(reason, "service stopping")

    def all_closed(self) -> defer.Deferred[None]:
        """Fires once no device connection is open."""
        if not self.connections:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._empty_waiters.append(waiter)
        return waiter

    def held_imeis(self) -> list[str]:
        return list(self.by_imei)
