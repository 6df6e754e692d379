"""The IMEI handshake a device sends first on TCP: uint16 length + ASCII IMEI.

Real devices send length 15 and 15 decimal digits (protocol.md §1). Anything else
is malformed; a length of 0 or above :data:`MAX_IMEI_LENGTH` is garbage or an attack.
"""

from __future__ import annotations

from .model import MalformedImei, Truncated

__all__ = [
    "IMEI_LENGTH",
    "MAX_IMEI_LENGTH",
    "check_imei_length",
    "decode_imei",
    "encode_imei",
    "first_non_digit",
]

IMEI_LENGTH = 15
MAX_IMEI_LENGTH = 32


def check_imei_length(length: int, offset: int = 0) -> None:
    """Raise :class:`MalformedImei` unless ``length`` is 15; ``offset``: the length field."""
    if length == IMEI_LENGTH:
        return
    if length == 0 or length > MAX_IMEI_LENGTH:
        reason = f"IMEI length {length} is outside 1..{MAX_IMEI_LENGTH}"
    else:
        reason = f"IMEI length {length}, expected {IMEI_LENGTH}"
    raise MalformedImei(reason, field="imei_length", offset=offset)


def first_non_digit(data: bytes | bytearray, start: int, end: int) -> int:
    """Index of the first byte in ``data[start:end]`` that is not an ASCII digit, or -1."""
    for index in range(start, end):
        if not 0x30 <= data[index] <= 0x39:
            return index
    return -1


def non_digit_error(byte: int, offset: int) -> MalformedImei:
    return MalformedImei(
        f"IMEI byte 0x{byte:02x} is not a decimal digit", field="imei", offset=offset
    )


def decode_imei(data: bytes) -> str:
    """Decode a whole handshake (``000F`` + 15 ASCII digits) to the IMEI string.

    Raises :class:`Truncated` when ``data`` ends early, :class:`MalformedImei` for a
    bad length, a non-digit or bytes after the IMEI.
    """
    size = len(data)
    if size < 2:
        raise Truncated(
            f"IMEI handshake needs a 2-byte length, got {size} bytes",
            field="imei_length",
            offset=size,
        )
    length = (data[0] << 8) | data[1]
    check_imei_length(length)
    bad = first_non_digit(data, 2, min(size, 2 + length))
    if bad >= 0:
        raise non_digit_error(data[bad], bad)
    if size < 2 + length:
        raise Truncated(
            f"IMEI handshake needs {2 + length} bytes, got {size}", field="imei", offset=size
        )
    if size > 2 + length:
        raise MalformedImei(
            f"{size - 2 - length} bytes after the IMEI", field="imei", offset=2 + length
        )
    return bytes(data[2:]).decode("ascii")


def encode_imei(imei: str) -> bytes:
    """The handshake for ``imei``: uint16 length + ASCII. Does not validate the digits
    (tests and the simulator also need to send bad handshakes)."""
    raw = imei.encode("ascii")
    if len(raw) > 0xFFFF:
        raise ValueError("IMEI longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def luhn_digit(body: str) -> int:
    """The Luhn check digit completing ``body`` (IMEIs end with one)."""
    total = 0
    for index, char in enumerate(reversed(body)):
        digit = ord(char) - 48
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10
