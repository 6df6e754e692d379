"""Incremental, pull-based framing of a device's TCP byte stream.

``feed()`` appends bytes; ``next_event()`` returns the next complete item
(:class:`Handshake`, :class:`KeepAlive`, :class:`AvlFrame`, :class:`CommandFrame`,
:class:`FrameError`) or None when more bytes are needed. It never raises.

Garbage is rejected as early as possible, without waiting for more bytes: an IMEI
length other than 15 as soon as the 2 length bytes are in, a non-digit as soon as
it arrives, a non-zero preamble byte as soon as it arrives, a declared data length
above ``max_frame_size`` as soon as the 8-byte header is in. Those errors are fatal
(``error.fatal``): the stream cannot be resynchronised, every later call returns
None. A CRC mismatch or an undecodable body with a known frame boundary is not
fatal: the frame is consumed and returned in ``FrameError.raw``.

Error offsets are relative to the start of the item (handshake or frame).

The buffer is a bytearray with a read offset, compacted once the consumed part
dominates, so feeding a 64 KiB frame one byte at a time stays linear.
"""

from __future__ import annotations

from . import accel
from .avl import decode_avl_data
from .command import decode_command_data
from .crc import crc16_ibm
from .imei import (
    IMEI_LENGTH,
    check_imei_length,
    first_non_digit,
    non_digit_error,
)
from .model import (
    AvlFrame,
    BadPreamble,
    CodecError,
    CommandFrame,
    CrcMismatch,
    FrameError,
    FramerEvent,
    FrameTooLarge,
    Handshake,
    KeepAlive,
    Malformed,
    UnknownCodec,
)
from .tcpframe import HEADER_SIZE, MIN_DATA_LENGTH, TRAILER_SIZE

__all__ = ["KEEPALIVE_BYTE", "Framer"]

KEEPALIVE_BYTE = 0xFF
_AVL_IDS = frozenset({0x08, 0x8E, 0x10})
_COMMAND_IDS = frozenset({0x0C, 0x0D, 0x0E})
_COMPACT_AT = 1 << 16  # consumed bytes worth a memmove

_HANDSHAKE = 0
_FRAMES = 1
_FAILED = 2


class Framer:
    """Turns a device's TCP byte stream into framer events (see the module doc)."""

    __slots__ = ("_buf", "_checked", "_frame_size", "_max", "_pos", "_state")

    def __init__(self, max_frame_size: int = 65536, expect_handshake: bool = True) -> None:
        self._max = max_frame_size
        self._buf = bytearray()
        self._pos = 0  # read offset in _buf
        self._state = _HANDSHAKE if expect_handshake else _FRAMES
        # Bytes of the current item already validated (IMEI digits, preamble bytes).
        self._checked = 0
        # Whole size of the current frame once its header is in, else 0.
        self._frame_size = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes. Never raises; ignored once the stream has failed."""
        if self._state != _FAILED:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held, not yet consumed."""
        return len(self._buf) - self._pos

    def release(self) -> int:
        """Drop the buffered bytes (the connection is gone); returns how many there were.
        Later feeds are ignored, as after a fatal error."""
        held = len(self._buf)
        self._state = _FAILED
        self._buf = bytearray()
        self._pos = 0
        return held

    @property
    def failed(self) -> bool:
        """True after a fatal FrameError: every later next_event() returns None."""
        return self._state == _FAILED

    def next_event(self) -> FramerEvent | None:
        """The next complete item, or None if more bytes are needed. Never raises."""
        try:
            if self._state == _FRAMES:
                return self._next_frame()
            if self._state == _HANDSHAKE:
                return self._next_handshake()
            return None
        except Exception as exc:  # a bug must not kill the connection's reader
            return self._fail(Malformed(f"internal framer error: {exc!r}", field="stream"))

    # ------------------------------------------------------------------ internals

    def _fail(self, error: CodecError) -> FrameError:
        error = _detached(error)
        error.fatal = True
        self._state = _FAILED
        self._buf = bytearray()
        self._pos = 0
        return FrameError(error)

    def _consume(self, size: int) -> bytes:
        buf = self._buf
        start = self._pos
        end = start + size
        if start == 0 and end == len(buf):
            item = bytes(buf)
            buf.clear()
            end = 0
        else:
            item = bytes(buf[start:end])
            if end == len(buf):
                buf.clear()
                end = 0
            elif end >= _COMPACT_AT and end * 2 >= len(buf):
                del buf[:end]
                end = 0
        self._pos = end
        self._checked = 0
        self._frame_size = 0
        return item

    def _next_handshake(self) -> FramerEvent | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 2:
            return None
        try:
            check_imei_length((buf[pos] << 8) | buf[pos + 1])
        except CodecError as exc:
            return self._fail(exc)
        whole = 2 + IMEI_LENGTH
        seen = min(avail, whole)
        start = max(self._checked, 2)
        if seen > start:
            bad = first_non_digit(buf, pos + start, pos + seen)
            if bad >= 0:
                return self._fail(non_digit_error(buf[bad], bad - pos))
            self._checked = seen
        if avail < whole:
            return None
        raw = self._consume(whole)
        self._state = _FRAMES
        return Handshake(raw[2:].decode("ascii"))

    def _next_frame(self) -> FramerEvent | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        size = self._frame_size
        if not size:
            if not avail:
                return None
            checked = self._checked
            if not checked and buf[pos] == KEEPALIVE_BYTE:
                self._consume(1)
                return KeepAlive()
            if checked < 4:
                for index in range(checked, min(avail, 4)):
                    if buf[pos + index]:
                        return self._fail(
                            BadPreamble(
                                f"preamble must be 00000000, got byte 0x{buf[pos + index]:02x}",
                                field="preamble",
                                offset=index,
                            )
                        )
                self._checked = checked = min(avail, 4)
            if avail < HEADER_SIZE:
                return None
            length = int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if length > self._max:
                return self._fail(
                    FrameTooLarge(
                        f"data field length {length} exceeds the maximum of {self._max}",
                        field="data_length",
                        offset=4,
                    )
                )
            if length < MIN_DATA_LENGTH:
                return self._fail(
                    Malformed(
                        f"data field length {length} is below the minimum of {MIN_DATA_LENGTH}",
                        field="data_length",
                        offset=4,
                    )
                )
            self._frame_size = size = HEADER_SIZE + length + TRAILER_SIZE
        if avail < size:
            return None
        return _decode_frame(self._consume(size))


def _decode_frame(frame: bytes) -> FramerEvent:
    """CRC first, then the body by codec id. Never raises CodecError."""
    crc_at = len(frame) - TRAILER_SIZE
    data = frame[HEADER_SIZE:crc_at]
    codec_id = data[0]
    declared = data[1]
    said = int.from_bytes(frame[crc_at:], "big")
    computed = crc16_ibm(data)
    if said != computed:
        return FrameError(CrcMismatch(said, computed, offset=crc_at), frame, codec_id, declared)
    if codec_id in _AVL_IDS and accel.payload_parts is not None:
        try:
            codec, count, parts = accel.payload_parts(data)
        except ValueError:
            pass  # malformed, or a case only the Python decoder handles: it decides below
        else:
            return AvlFrame.from_parts(frame, codec, count, parts)
    try:
        if codec_id in _AVL_IDS:
            return AvlFrame(decode_avl_data(data, HEADER_SIZE), frame)
        if codec_id in _COMMAND_IDS:
            return CommandFrame(decode_command_data(data, HEADER_SIZE), frame)
        raise UnknownCodec(codec_id, offset=HEADER_SIZE)
    except CodecError as exc:
        return FrameError(_detached(exc), frame, codec_id, declared)


def _detached(error: CodecError) -> CodecError:
    """The error without its traceback and chained exceptions: returned as an event it
    would otherwise keep the raising frames (and through them the caller's protocol and
    transport) alive in a reference cycle that only the cyclic GC frees."""
    error.__traceback__ = None
    error.__cause__ = None
    error.__context__ = None
    return error
