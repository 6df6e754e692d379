"""The outer TCP frame shared by every codec (protocol.md §2):

``00000000`` preamble, uint32 data field length, data field (codec id .. number of
data 2), uint32 CRC whose upper two bytes are zero.

Whole-buffer helpers; the incremental reader is :class:`~.framing.Framer`.
"""

from __future__ import annotations

import struct

from .crc import crc16_ibm
from .model import BadPreamble, CrcMismatch, Malformed, Truncated

__all__ = ["HEADER_SIZE", "MIN_DATA_LENGTH", "TRAILER_SIZE", "unwrap_frame", "wrap_frame"]

HEADER_SIZE = 8  # preamble + data field length
TRAILER_SIZE = 4  # CRC field
#: codec id + number of data 1 + number of data 2
MIN_DATA_LENGTH = 3

_HEADER = struct.Struct(">II")
_CRC = struct.Struct(">I")
_PREAMBLE = bytes(4)


def wrap_frame(data: bytes) -> bytes:
    """Preamble + length + ``data`` + CRC: a whole TCP frame."""
    return _HEADER.pack(0, len(data)) + data + _CRC.pack(crc16_ibm(data))


def unwrap_frame(frame: bytes) -> bytes:
    """Check a whole frame (nothing more, nothing less) and return its data field.

    Raises :class:`Truncated`, :class:`BadPreamble`, :class:`Malformed` (length
    below 3, bytes after the CRC) or :class:`CrcMismatch`. Offsets are frame offsets.
    """
    size = len(frame)
    for index in range(min(size, 4)) if frame[:4] != _PREAMBLE else ():
        if frame[index]:
            raise BadPreamble(
                f"preamble must be 00000000, got byte 0x{frame[index]:02x}",
                field="preamble",
                offset=index,
            )
    if size < HEADER_SIZE:
        raise Truncated(
            f"frame header needs {HEADER_SIZE} bytes, got {size}",
            field="data_length",
            offset=size,
        )
    _, length = _HEADER.unpack_from(frame)
    if length < MIN_DATA_LENGTH:
        raise Malformed(
            f"data field length {length} is below the minimum of {MIN_DATA_LENGTH}",
            field="data_length",
            offset=4,
        )
    whole = HEADER_SIZE + length + TRAILER_SIZE
    if size < whole:
        raise Truncated(
            f"frame declares {length} data bytes and needs {whole} bytes in all, got {size}",
            field="data" if size < HEADER_SIZE + length else "crc",
            offset=size,
        )
    if size > whole:
        raise Malformed(
            f"{size - whole} bytes after the CRC (frame declares {length} data bytes)",
            field="crc",
            offset=whole,
        )
    data = frame[HEADER_SIZE : HEADER_SIZE + length]
    (said,) = _CRC.unpack_from(frame, HEADER_SIZE + length)
    computed = crc16_ibm(data)
    if said != computed:
        raise CrcMismatch(said, computed, offset=HEADER_SIZE + length)
    return data
