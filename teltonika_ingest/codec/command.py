"""Codec 12, 13 and 14 GPRS commands, responses and messages (protocol.md §5).

Data field: codec id, quantity 1, type, uint32 size, body, quantity 2.

* Codec 12: body = text (type 05 command, 06 response).
* Codec 13: size = 4 + text length; body = uint32 timestamp (s) + text. Type 05 in the
  vendor's current example, 06 in its older documentation ("always 0x06 from the device")
  and in independent device captures: both are accepted.
* Codec 14: size = 8 + text length; body = IMEI as 8 bytes (16 hex digits, ``0`` +
  15 IMEI digits) + text (05 command, 06 ACK); type 11 (nACK) carries the IMEI only.

One message per frame: quantity 1 must be 1. Quantity 2 is *not* checked: the
vendor's Codec 12 description says "this byte will not be parsed but it's
recommended that it should contain same value as Command/Response Quantity 1",
so a device may legitimately send another value there.
"""

from __future__ import annotations

import struct

from .model import (
    CODEC_12,
    CODEC_13,
    CODEC_14,
    CODEC_ID_OF,
    CODEC_IDS,
    COMMAND_CODECS,
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    CommandMessage,
    Malformed,
    UnknownCodec,
)
from .tcpframe import HEADER_SIZE, unwrap_frame, wrap_frame

__all__ = [
    "decode_command_data",
    "decode_command_frame",
    "encode_command",
    "encode_command_data",
    "encode_command_message",
    "encode_imei_bcd",
]

_TYPES_BY_CODEC: dict[str, frozenset[int]] = {
    CODEC_12: frozenset({TYPE_COMMAND, TYPE_RESPONSE}),
    CODEC_13: frozenset({TYPE_COMMAND, TYPE_RESPONSE}),
    CODEC_14: frozenset({TYPE_COMMAND, TYPE_RESPONSE, TYPE_NACK}),
}
_U32 = struct.Struct(">I")
# codec id, quantity 1, type, size
_HEAD = struct.Struct(">BBBI")
_IMEI_SIZE = 8


def encode_imei_bcd(imei: str) -> bytes:
    """A 15-digit IMEI as the 8 bytes Codec 14 carries (hex digits ``0`` + IMEI)."""
    if len(imei) != 15 or not (imei.isascii() and imei.isdigit()):
        raise ValueError(f"an IMEI is 15 decimal digits, got {imei!r}")
    return bytes.fromhex("0" + imei)


def _decode_imei_bcd(raw: bytes, offset: int) -> str:
    digits = raw.hex()
    if digits[0] != "0" or not digits[1:].isdigit():
        raise Malformed(
            f"Codec 14 IMEI must be 0 + 15 decimal digits, got {digits}",
            field="imei",
            offset=offset,
        )
    return digits[1:]


def decode_command_data(data: bytes, offset_base: int = 0) -> CommandMessage:
    """Decode a Codec 12/13/14 data field (codec id .. quantity 2).

    Raises :class:`UnknownCodec` (also for AVL codecs) or :class:`Malformed`.
    Offsets are ``offset_base`` + the offset in ``data``.
    """
    data = bytes(data)
    size = len(data)
    if size < 1:
        raise Malformed("empty data field", field="codec_id", offset=offset_base)
    codec = CODEC_IDS.get(data[0])
    if codec not in COMMAND_CODECS:
        raise UnknownCodec(data[0], offset=offset_base)
    assert codec is not None
    if size < _HEAD.size + 1:
        raise Malformed(
            f"data field of {size} bytes; a Codec {codec} message needs at least {_HEAD.size + 1}",
            field="data",
            offset=offset_base + size,
        )
    _, quantity, msg_type, body_size = _HEAD.unpack_from(data)
    if quantity != 1:
        raise Malformed(
            f"quantity 1 is {quantity}: one message per frame is supported",
            field="quantity_1",
            offset=offset_base + 1,
        )
    if msg_type not in _TYPES_BY_CODEC[codec]:
        raise Malformed(
            f"type 0x{msg_type:02x} is not a Codec {codec} message type",
            field="type",
            offset=offset_base + 2,
        )
    body_at = _HEAD.size
    last = size - 1  # quantity 2
    if body_at + body_size != last:
        raise Malformed(
            f"size {body_size} says the message ends at offset {offset_base + body_at + body_size}"
            f" but quantity 2 is at offset {offset_base + last}",
            field="size",
            offset=offset_base + 3,
        )
    body = data[body_at:last]
    imei: str | None = None
    timestamp_ms: int | None = None
    if codec == CODEC_13:
        if body_size < 4:
            raise Malformed(
                f"size {body_size}: a Codec 13 message starts with a 4-byte timestamp",
                field="size",
                offset=offset_base + 3,
            )
        timestamp_ms = _U32.unpack_from(body)[0] * 1000
        payload = body[4:]
    elif codec == CODEC_14:
        if body_size < _IMEI_SIZE or (msg_type == TYPE_NACK and body_size != _IMEI_SIZE):
            raise Malformed(
                f"size {body_size}: a Codec 14 type 0x{msg_type:02x} message starts with "
                "the 8-byte IMEI" + (" and carries nothing else" if msg_type == TYPE_NACK else ""),
                field="size",
                offset=offset_base + 3,
            )
        imei = _decode_imei_bcd(body[:_IMEI_SIZE], offset_base + body_at)
        payload = body[_IMEI_SIZE:]
    else:
        payload = body
    return CommandMessage(codec, msg_type, payload, imei, timestamp_ms)


def decode_command_frame(frame: bytes) -> CommandMessage:
    """Decode a whole Codec 12/13/14 TCP frame. Offsets in errors are frame offsets."""
    return decode_command_data(unwrap_frame(frame), offset_base=HEADER_SIZE)


def encode_command_data(msg: CommandMessage) -> bytes:
    """The data field (codec id .. quantity 2) of any CommandMessage."""
    if msg.codec not in COMMAND_CODECS:
        raise ValueError(f"not a command codec: {msg.codec!r}")
    if msg.type not in _TYPES_BY_CODEC[msg.codec]:
        raise ValueError(f"type 0x{msg.type:02x} is not a Codec {msg.codec} message type")
    payload = bytes(msg.payload)
    if msg.codec == CODEC_13:
        if msg.timestamp_ms is None:
            raise ValueError("a Codec 13 message needs a timestamp")
        seconds, rest = divmod(msg.timestamp_ms, 1000)
        if rest or not 0 <= seconds <= 0xFFFFFFFF:
            raise ValueError(
                f"Codec 13 timestamp {msg.timestamp_ms} ms is not whole seconds in uint32 range"
            )
        body = _U32.pack(seconds) + payload
    elif msg.codec == CODEC_14:
        if msg.imei is None:
            raise ValueError("a Codec 14 message needs an IMEI")
        if msg.type == TYPE_NACK and payload:
            raise ValueError("a Codec 14 nACK carries no text")
        body = encode_imei_bcd(msg.imei) + payload
    else:
        body = payload
    if len(body) > 0xFFFFFFFF:  # pragma: no cover - 4 GiB
        raise ValueError("message too long")
    return _HEAD.pack(CODEC_ID_OF[msg.codec], 1, msg.type, len(body)) + body + b"\x01"


def encode_command_message(msg: CommandMessage) -> bytes:
    """A whole TCP frame carrying ``msg`` (any codec 12/13/14 message, any direction)."""
    return wrap_frame(encode_command_data(msg))


def encode_command(
    text_or_payload: bytes | str, *, codec: str = CODEC_12, imei: str | None = None
) -> bytes:
    """A whole server -> device command frame (type 05) for Codec 12 or 14.

    ``codec="14"`` needs the device's 15-digit ``imei``; a ``str`` command must be ASCII.
    """
    if isinstance(text_or_payload, str):
        payload = text_or_payload.encode("ascii")
    else:
        payload = bytes(text_or_payload)
    if codec == CODEC_12:
        return encode_command_message(CommandMessage(CODEC_12, TYPE_COMMAND, payload))
    if codec == CODEC_14:
        if imei is None:
            raise ValueError("a Codec 14 command needs the device IMEI")
        return encode_command_message(CommandMessage(CODEC_14, TYPE_COMMAND, payload, imei))
    raise ValueError(f"commands are sent with codec 12 or 14, not {codec!r}")
