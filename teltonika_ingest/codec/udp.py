"""UDP datagrams (protocol.md §4): header + IMEI + an AVL data field, no CRC.

``length(2) packet_id(2) 01 avl_packet_id(1) imei_length(2) imei(15)`` then codec id,
number of data 1, records, number of data 2. The third header byte is documented as
"not usable" (always 01): it is not checked, and the encoder writes 01.
Only AVL codecs (8, 8E, 16) travel in a :class:`UdpPacket`; another codec id raises
:class:`UnknownCodec`.
"""

from __future__ import annotations

import struct

from .avl import decode_avl_data, encode_avl_data
from .imei import check_imei_length, first_non_digit, non_digit_error
from .model import Malformed, Truncated, UdpPacket

__all__ = ["decode_udp_datagram", "encode_udp_ack", "encode_udp_datagram"]

# length, packet id, not usable byte, AVL packet id, IMEI length
_HEADER = struct.Struct(">HHBBH")
_ACK = struct.Struct(">HHBBB")


def decode_udp_datagram(data: bytes) -> UdpPacket:
    """Decode one datagram. Raises :class:`Truncated` (shorter than its length field),
    :class:`Malformed` (bytes beyond it, a data field too short), :class:`MalformedImei`
    and whatever :func:`decode_avl_data` raises; offsets are datagram offsets."""
    data = bytes(data)
    size = len(data)
    if size < _HEADER.size:
        raise Truncated(
            f"UDP header needs {_HEADER.size} bytes, got {size}",
            field="header",
            offset=size,
        )
    length, packet_id, _unused, avl_packet_id, imei_length = _HEADER.unpack_from(data)
    if size < 2 + length:
        raise Truncated(
            f"datagram length field says {2 + length} bytes, got {size}",
            field="length",
            offset=size,
        )
    if size > 2 + length:
        raise Malformed(
            f"{size - 2 - length} bytes beyond the datagram length field ({length})",
            field="length",
            offset=2 + length,
        )
    check_imei_length(imei_length, offset=6)
    imei_at = _HEADER.size
    data_at = imei_at + imei_length
    bad = first_non_digit(data, imei_at, min(size, data_at))
    if bad >= 0:
        raise non_digit_error(data[bad], bad)
    if size < data_at + 3:
        raise Malformed(
            f"datagram of {size} bytes leaves no room for codec id and record counts "
            f"after the IMEI (offset {data_at})",
            field="data",
            offset=size,
        )
    imei = data[imei_at:data_at].decode("ascii")
    packet = decode_avl_data(data[data_at:], offset_base=data_at)
    return UdpPacket(packet_id, avl_packet_id, imei, packet)


def encode_udp_datagram(pkt: UdpPacket) -> bytes:
    """The datagram carrying ``pkt`` (not usable byte = 01)."""
    imei = pkt.imei.encode("ascii")
    body = (
        _HEADER.pack(0, pkt.packet_id, 0x01, pkt.avl_packet_id, len(imei))[2:]
        + imei
        + encode_avl_data(pkt.packet)
    )
    if len(body) > 0xFFFF:
        raise ValueError(f"datagram body of {len(body)} bytes exceeds the uint16 length field")
    return len(body).to_bytes(2, "big") + body


def encode_udp_ack(packet_id: int, avl_packet_id: int, count: int) -> bytes:
    """Server ACK: ``0005`` + packet id + ``01`` + AVL packet id + accepted records."""
    return _ACK.pack(5, packet_id, 0x01, avl_packet_id, count)
