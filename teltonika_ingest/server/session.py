"""Per-connection state machine of a device TCP session (sans-IO).

The machine never touches a socket, a clock or Redis: the Twisted protocol feeds it
bytes and outcomes, and it answers with a list of *actions* for the protocol to carry
out (write bytes, publish a packet, close, ...). Every transition is therefore testable
with plain bytes.

States::

    AWAITING_IMEI --Handshake--> AUTHORIZING --accepted--> IDLE
                                      └------rejected----> CLOSED
    IDLE --AvlFrame / dead-letter frame--> PUBLISHING --published--> IDLE (ACK written)
                                                └-------failed-----> CLOSED (no ACK: device resends)
    any --fatal framing error / CRC failure / close()--> CLOSED

While AUTHORIZING or PUBLISHING, further bytes are buffered (bounded by ``max_buffer``),
not acted on. GPRS commands are written only from IDLE, one in flight at a time.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any

import attrs

from teltonika_ingest.codec import (
    CODEC_IDS,
    COMMAND_CODECS,
    TYPE_NACK,
    TYPE_RESPONSE,
    AvlFrame,
    CommandFrame,
    CommandMessage,
    CrcMismatch,
    FrameError,
    Framer,
    FrameTooLarge,
    Handshake,
    KeepAlive,
    MalformedImei,
    UnknownCodec,
    ack_bytes,
)


class State(enum.Enum):
    AWAITING_IMEI = "awaiting_imei"
    AUTHORIZING = "authorizing"
    IDLE = "idle"
    PUBLISHING = "publishing"
    CLOSED = "closed"


# --------------------------------------------------------------------------- actions


@attrs.frozen(slots=True)
class Send:
    """Write these bytes to the device."""

    data: bytes


@attrs.frozen(slots=True)
class Authorize:
    """Decide whether this IMEI may connect; answer with ``Session.authorized``."""

    imei: str


@attrs.frozen(slots=True)
class Accepted:
    """The handshake was accepted (register the IMEI)."""

    imei: str


@attrs.frozen(slots=True)
class Publish:
    """Publish this packet's records; answer with ``Session.published`` / ``publish_failed``."""

    frame: AvlFrame


@attrs.frozen(slots=True)
class DeadLetter:
    """Write this CRC-valid but undecodable frame to the dead-letter stream; answer with
    ``Session.published`` / ``publish_failed``. ``ack_count`` is what to ACK afterwards
    (None for command-codec frames, which never get a record ACK)."""

    error: FrameError
    ack_count: int | None
    codec: str
    reason: str


@attrs.frozen(slots=True)
class FrameRejected:
    """A frame was refused (metric + log); ``result`` is a ``teltonika_frames_total`` result."""

    codec: str
    result: str
    detail: str


@attrs.frozen(slots=True)
class KeepAliveSeen:
    pass


@attrs.frozen(slots=True)
class CommandSent:
    """A command was written to the device (start its timeout)."""

    command: Any


@attrs.frozen(slots=True)
class CommandAnswered:
    """The device answered the command in flight."""

    command: Any
    message: CommandMessage


@attrs.frozen(slots=True)
class DeviceMessage:
    """A Codec 13 message, or an answer with no command in flight."""

    message: CommandMessage
    unsolicited: bool = False


@attrs.frozen(slots=True)
class CommandsAbandoned:
    """The session closed; these commands got no answer (``not_connected``)."""

    commands: tuple[Any, ...]


@attrs.frozen(slots=True)
class Close:
    """Close the connection. ``reason`` is a short metric label; ``detail`` is for the log."""

    reason: str
    detail: str = ""
    handshake_reply: bytes | None = None


Action = (
    Send
    | Authorize
    | Accepted
    | Publish
    | DeadLetter
    | FrameRejected
    | KeepAliveSeen
    | CommandSent
    | CommandAnswered
    | DeviceMessage
    | CommandsAbandoned
    | Close
)

HANDSHAKE_ACCEPT = b"\x01"
HANDSHAKE_REJECT = b"\x00"


def _codec_label(codec_id: int | None) -> str:
    if codec_id is None:
        return "unknown"
    return CODEC_IDS.get(codec_id, "unknown")


@attrs.define
class PendingCommand:
    """What the session needs of a command: the frame to write and an opaque handle."""

    frame: bytes
    handle: Any = None


class Session:
    """The state machine of one device connection."""

    def __init__(self, *, max_frame_size: int = 65536, max_buffer: int = 262144) -> None:
        self.state = State.AWAITING_IMEI
        self.imei: str | None = None
        self.max_buffer = max_buffer
        self._framer = Framer(max_frame_size=max_frame_size)
        # a list, not a deque: an empty deque takes 760 bytes, an empty list 56, and a device
        # seldom has more than a command or two waiting (x 100,000 connections: 70 MB)
        self._commands: list[PendingCommand] = []
        self.command_in_flight: PendingCommand | None = None
        #: the ACK to write once the pending publish succeeds (None: no ACK)
        self._ack_after_publish: int | None = None

    # ------------------------------------------------------------------ inputs

    def receive(self, data: bytes) -> list[Action]:
        """Bytes from the device."""
        if self.state is State.CLOSED:
            return []
        self._framer.feed(data)
        return self._pump()

    def authorized(self, accepted: bool) -> list[Action]:
        """Answer to an ``Authorize`` action."""
        if self.state is not State.AUTHORIZING:
            return []
        assert self.imei is not None
        if not accepted:
            return self._close(
                "handshake_rejected",
                f"IMEI {self.imei} not allowed",
                handshake_reply=HANDSHAKE_REJECT,
            )
        self.state = State.IDLE
        actions: list[Action] = [Send(HANDSHAKE_ACCEPT), Accepted(self.imei)]
        actions.extend(self._pump())
        return actions

    def published(self) -> list[Action]:
        """The pending packet is safely in Redis: ACK it and go on."""
        if self.state is not State.PUBLISHING:
            return []
        self.state = State.IDLE
        actions: list[Action] = []
        if self._ack_after_publish is not None:
            actions.append(Send(ack_bytes(self._ack_after_publish)))
            self._ack_after_publish = None
        actions.extend(self._pump())
        return actions

    def publish_failed(self, detail: str) -> list[Action]:
        """The pending packet is not in Redis: no ACK; close so the device resends."""
        if self.state is not State.PUBLISHING:
            return []
        self._ack_after_publish = None
        return self._close("publish_failed", detail)

    def enqueue_command(self, command: PendingCommand) -> list[Action]:
        """Queue a GPRS command; it is written as soon as the session is idle."""
        if self.state is State.CLOSED:
            return [CommandsAbandoned((command.handle,))]
        self._commands.append(command)
        return self._maybe_send_command()

    def command_timed_out(self, command: PendingCommand) -> list[Action]:
        """The command in flight got no answer in time: forget it, send the next."""
        if self.command_in_flight is not command:
            # Not yet written: drop it from the queue.
            with contextlib.suppress(ValueError):
                self._commands.remove(command)
            return []
        self.command_in_flight = None
        return self._maybe_send_command()

    def close(self, reason: str, detail: str = "") -> list[Action]:
        """The connection is going away (timeout, transport closed, shutdown)."""
        if self.state is State.CLOSED:
            return []
        return self._close(reason, detail)

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    def release(self) -> int:
        """The connection closed: free the buffer now (the session object may live on a
        while, referenced by a timer or a pending publish). Returns the bytes dropped."""
        return self._framer.release()

    # ------------------------------------------------------------------ internals

    def _close(
        self, reason: str, detail: str, handshake_reply: bytes | None = None
    ) -> list[Action]:
        self.state = State.CLOSED
        actions: list[Action] = [Close(reason, detail, handshake_reply)]
        abandoned = []
        if self.command_in_flight is not None:
            abandoned.append(self.command_in_flight.handle)
            self.command_in_flight = None
        abandoned.extend(c.handle for c in self._commands)
        self._commands.clear()
        if abandoned:
            actions.append(CommandsAbandoned(tuple(abandoned)))
        return actions

    def _maybe_send_command(self) -> list[Action]:
        if self.state is not State.IDLE or self.command_in_flight is not None or not self._commands:
            return []
        command = self._commands.pop(0)
        self.command_in_flight = command
        return [Send(command.frame), CommandSent(command.handle)]

    def _pump(self) -> list[Action]:
        actions: list[Action] = []
        framer = self._framer
        while self.state is State.AWAITING_IMEI or self.state is State.IDLE:
            event = framer.next_event()
            if event is None:
                break
            if type(event) is AvlFrame:
                self.state = State.PUBLISHING
                self._ack_after_publish = event.record_count
                actions.append(Publish(event))
            elif type(event) is KeepAlive:
                actions.append(KeepAliveSeen())
            elif type(event) is CommandFrame:
                actions.extend(self._on_command_frame(event))
            elif type(event) is Handshake:
                self.imei = event.imei
                self.state = State.AUTHORIZING
                actions.append(Authorize(event.imei))
            elif type(event) is FrameError:
                actions.extend(self._on_frame_error(event))
            else:  # pragma: no cover - the framer has no other events
                raise AssertionError(f"unexpected framer event {event!r}")
        if self.state is State.IDLE:
            actions.extend(self._maybe_send_command())
        if self.state is not State.CLOSED and framer.buffered > self.max_buffer:
            actions.extend(
                self._close(
                    "buffer_overflow",
                    f"{framer.buffered} bytes buffered, over --max-buffer {self.max_buffer}",
                )
            )
        return actions

    def _on_command_frame(self, event: CommandFrame) -> list[Action]:
        message = event.message
        if message.codec in (COMMAND_CODECS - {"13"}) and message.type in (
            TYPE_RESPONSE,
            TYPE_NACK,
        ):
            if self.command_in_flight is None:
                return [DeviceMessage(message, unsolicited=True)]
            command = self.command_in_flight
            self.command_in_flight = None
            return [CommandAnswered(command.handle, message)]
        # Codec 13 (device -> server one-way), or a command-type frame from a device.
        return [DeviceMessage(message, unsolicited=message.codec != "13")]

    def _on_frame_error(self, event: FrameError) -> list[Action]:
        error = event.error
        codec = _codec_label(event.codec_id)
        if self.state is State.AWAITING_IMEI or isinstance(error, MalformedImei):
            return self._close("handshake_malformed", str(error), handshake_reply=HANDSHAKE_REJECT)
        if error.fatal:
            result = "too_large" if isinstance(error, FrameTooLarge) else "malformed"
            return [FrameRejected(codec, result, str(error)), *self._close(result, str(error))]
        if isinstance(error, CrcMismatch):
            return [
                FrameRejected(codec, "crc_fail", str(error)),
                *self._close("crc_fail", str(error)),
            ]
        # CRC-valid but undecodable: dead-letter it whole, then ACK its declared count so the
        # device does not resend it forever. Command-codec frames get no record ACK.
        reason = "unknown_codec" if isinstance(error, UnknownCodec) else "malformed"
        if event.raw is None:  # pragma: no cover - the framer always gives raw here
            return [FrameRejected(codec, reason, str(error)), *self._close(reason, str(error))]
        ack_count = None if codec in COMMAND_CODECS else (event.declared_count or 0)
        self.state = State.PUBLISHING
        self._ack_after_publish = ack_count
        return [DeadLetter(event, ack_count, codec, reason)]
