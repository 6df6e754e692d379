"""Value types of the codec: records, framer events and typed errors.

Pure data: no Twisted, no Redis, no clock, no logging.
"""

from __future__ import annotations

import attrs

# Codec names as they appear in the stream entry and payload (contract.md §3).
CODEC_8 = "8"
CODEC_8E = "8E"
CODEC_16 = "16"
CODEC_12 = "12"
CODEC_13 = "13"
CODEC_14 = "14"

CODEC_IDS: dict[int, str] = {
    0x08: CODEC_8,
    0x8E: CODEC_8E,
    0x10: CODEC_16,
    0x0C: CODEC_12,
    0x0D: CODEC_13,
    0x0E: CODEC_14,
}
CODEC_ID_OF: dict[str, int] = {name: cid for cid, name in CODEC_IDS.items()}
AVL_CODECS = frozenset({CODEC_8, CODEC_8E, CODEC_16})
COMMAND_CODECS = frozenset({CODEC_12, CODEC_13, CODEC_14})

# Command/response type bytes (protocol.md §5).
TYPE_COMMAND = 0x05
TYPE_RESPONSE = 0x06
TYPE_NACK = 0x11


# --------------------------------------------------------------------------- records


@attrs.frozen(slots=True)
class AvlRecord:
    """One AVL record, raw wire values (no scaling, no signs beyond the wire types).

    IO values are kept per wire width so that the payload can tell 8-byte values
    (``__bigint``) from narrower ones and the encoder can round-trip exactly.
    Dict insertion order is wire order.
    """

    timestamp_ms: int  # uint64, ms since epoch UTC
    priority: int  # uint8
    longitude: int  # int32, degrees * 10^7
    latitude: int  # int32, degrees * 10^7
    altitude: int  # int16, metres
    angle: int  # uint16
    satellites: int  # uint8
    speed: int  # uint16, km/h
    event_io_id: int
    generation_type: int | None = None  # Codec 16 only
    io1: dict[int, int] = attrs.field(factory=dict)
    io2: dict[int, int] = attrs.field(factory=dict)
    io4: dict[int, int] = attrs.field(factory=dict)
    io8: dict[int, int] = attrs.field(factory=dict)
    iox: dict[int, bytes] = attrs.field(factory=dict)  # Codec 8E NX (variable length)


@attrs.frozen(slots=True)
class AvlPacket:
    """The decoded data field of a Codec 8/8E/16 frame or UDP datagram."""

    codec: str  # "8" | "8E" | "16"
    records: tuple[AvlRecord, ...]


@attrs.frozen(slots=True)
class CommandMessage:
    """A Codec 12/13/14 command, response or message (one per frame in practice)."""

    codec: str  # "12" | "13" | "14"
    type: int  # TYPE_COMMAND (5), TYPE_RESPONSE (6) or TYPE_NACK (0x11)
    payload: bytes  # command/response text as sent (ASCII normally; binary allowed)
    imei: str | None = None  # Codec 14 only
    timestamp_ms: int | None = None  # Codec 13 only (wire carries seconds)

    @property
    def text(self) -> str:
        """Payload as text; bytes outside ASCII are replaced, never raise."""
        return self.payload.decode("ascii", "replace")


@attrs.frozen(slots=True)
class UdpPacket:
    """A decoded UDP datagram (protocol.md §4)."""

    packet_id: int
    avl_packet_id: int
    imei: str
    packet: AvlPacket


# --------------------------------------------------------------------------- errors


class CodecError(Exception):
    """Base of every error the codec reports. ``field`` and ``offset`` locate it."""

    #: True when the byte stream cannot be resynchronised after this error
    #: (the connection must be closed without reading further).
    fatal: bool = False

    def __init__(self, message: str, *, field: str = "", offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.offset = offset

    def __str__(self) -> str:
        where = []
        if self.field:
            where.append(f"field {self.field}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class Truncated(CodecError):
    """Input ended before a complete item (only from whole-buffer decoders)."""


class BadPreamble(CodecError):
    fatal = True


class FrameTooLarge(CodecError):
    fatal = True


class MalformedImei(CodecError):
    fatal = True


class CrcMismatch(CodecError):
    """CRC over codec id .. number of data 2 does not match the trailer."""

    def __init__(self, expected: int, actual: int, *, offset: int | None = None) -> None:
        super().__init__(
            f"CRC mismatch: frame says 0x{expected:04x}, computed 0x{actual:04x}",
            field="crc",
            offset=offset,
        )
        self.expected = expected
        self.actual = actual


class UnknownCodec(CodecError):
    def __init__(self, codec_id: int, *, offset: int | None = None) -> None:
        super().__init__(f"unknown codec id 0x{codec_id:02x}", field="codec_id", offset=offset)
        self.codec_id = codec_id


class CountMismatch(CodecError):
    def __init__(self, count1: int, count2: int, *, offset: int | None = None) -> None:
        super().__init__(
            f"number of data 1 ({count1}) != number of data 2 ({count2})",
            field="number_of_data_2",
            offset=offset,
        )
        self.count1 = count1
        self.count2 = count2


class Malformed(CodecError):
    """Structure inconsistent with the declared lengths/counts (CRC was fine)."""


# --------------------------------------------------------------------------- framer events


@attrs.frozen(slots=True)
class Handshake:
    imei: str


@attrs.frozen(slots=True)
class KeepAlive:
    pass


class AvlFrame:
    """A CRC-valid Codec 8/8E/16 frame. ``raw`` is the whole frame.

    ``AvlFrame(packet, raw)`` holds the decoded packet. The framer's compiled path (see
    ``_fastavl.c``) builds it with :meth:`from_parts` instead: ``parts`` then holds every
    record's timestamp and JSON payload tail (``[ts0, tail0, ts1, tail1, ...]``) and
    ``packet`` is decoded from ``raw`` only if something asks for it (the publisher
    does not). Either way ``codec`` and ``record_count`` are set, and two frames with the
    same bytes are equal.
    """

    __slots__ = ("_packet", "codec", "parts", "raw", "record_count")

    def __init__(self, packet: AvlPacket, raw: bytes) -> None:
        self._packet: AvlPacket | None = packet
        self.raw = raw
        self.codec = packet.codec
        self.record_count = len(packet.records)
        self.parts: list[bytes] | None = None

    @classmethod
    def from_parts(cls, raw: bytes, codec: str, record_count: int, parts: list[bytes]) -> AvlFrame:
        frame = object.__new__(cls)
        frame._packet = None
        frame.raw = raw
        frame.codec = codec
        frame.record_count = record_count
        frame.parts = parts
        return frame

    @property
    def packet(self) -> AvlPacket:
        packet = self._packet
        if packet is None:
            from .avl import decode_avl_data  # avl imports this module
            from .tcpframe import HEADER_SIZE, TRAILER_SIZE

            packet = decode_avl_data(self.raw[HEADER_SIZE:-TRAILER_SIZE], HEADER_SIZE)
            self._packet = packet
        return packet

    @property
    def records(self) -> tuple[AvlRecord, ...]:
        return self.packet.records

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AvlFrame):
            return NotImplemented
        return self.raw == other.raw and self.packet == other.packet

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"AvlFrame(codec={self.codec!r}, records={self.record_count}, raw={self.raw!r})"


@attrs.frozen(slots=True)
class CommandFrame:
    """A CRC-valid Codec 12/13/14 frame, decoded."""

    message: CommandMessage
    raw: bytes


@attrs.frozen(slots=True)
class FrameError:
    """The framer met bad input. Never raised: returned as an event.

    * ``error.fatal`` (bad preamble, frame too large, malformed IMEI): the stream is
      unusable; close the connection. ``raw`` is None.
    * ``CrcMismatch``: the frame boundary is known, the content is not trustworthy.
    * other errors with a valid CRC (unknown codec, count mismatch, malformed body):
      ``raw`` holds the whole frame (a dead-letter candidate); ``codec_id`` and
      ``declared_count`` (number of data 1) are what the frame header says.
    """

    error: CodecError
    raw: bytes | None = None
    codec_id: int | None = None
    declared_count: int | None = None


FramerEvent = Handshake | KeepAlive | AvlFrame | CommandFrame | FrameError
