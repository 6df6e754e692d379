"""UDP datagrams, their ACK, and the TCP IMEI handshake."""

from __future__ import annotations

import pytest

from teltonika_ingest.codec import (
    AvlPacket,
    AvlRecord,
    CountMismatch,
    Malformed,
    MalformedImei,
    Truncated,
    UdpPacket,
    UnknownCodec,
    decode_imei,
    decode_udp_datagram,
    encode_imei,
    encode_udp_ack,
    encode_udp_datagram,
)

VECTOR = bytes.fromhex(
    "003dcafe0105000f33353230393330383634303336353508010000016b4f815b300100000000000000000000"
    "00000000000103021503010101425dbc000001"
)


def test_udp_ack():
    assert encode_udp_ack(0xCAFE, 5, 1) == bytes.fromhex("0005cafe010501")
    assert encode_udp_ack(0, 255, 255) == bytes.fromhex("00050000 01ff ff".replace(" ", ""))


def test_udp_round_trip_8e():
    rec = AvlRecord(1, 0, -1, -2, -3, 4, 5, 6, 7, iox={1: b"abc"})
    pkt = UdpPacket(65535, 255, "356307042441013", AvlPacket("8E", (rec,)))
    assert decode_udp_datagram(encode_udp_datagram(pkt)) == pkt


def test_udp_not_usable_byte_is_ignored():
    changed = VECTOR[:4] + b"\x07" + VECTOR[5:]
    assert decode_udp_datagram(changed) == decode_udp_datagram(VECTOR)


@pytest.mark.parametrize(
    ("data", "error", "field"),
    [
        (VECTOR[:5], Truncated, "header"),
        (VECTOR[:-1], Truncated, "length"),
        (VECTOR + b"\x00", Malformed, "length"),
        (b"\x00\x0d\xca\xfe\x01\x05\x00\x07" + b"1234567", MalformedImei, "imei_length"),
        (VECTOR[:9] + b"A" + VECTOR[10:], MalformedImei, "imei"),
        (VECTOR[:23] + b"\x0c" + VECTOR[24:], UnknownCodec, "codec_id"),
        (VECTOR[:-1] + b"\x02", CountMismatch, "number_of_data_2"),
        (b"\x00\x16" + VECTOR[2:8] + b"356307042441013" + b"\x08", Malformed, "data"),
    ],
)
def test_udp_errors(data, error, field):
    with pytest.raises(error) as info:
        decode_udp_datagram(data)
    assert info.value.field == field


def test_udp_record_offsets_are_datagram_offsets():
    corrupt = VECTOR[:-1] + b"\x03"
    with pytest.raises(CountMismatch) as info:
        decode_udp_datagram(corrupt)
    assert info.value.offset == len(VECTOR) - 1


def test_udp_encoder_limits():
    rec = AvlRecord(1, 0, 0, 0, 0, 0, 0, 0, 0, iox={i: bytes(1000) for i in range(70)})
    with pytest.raises(ValueError, match="uint16"):
        encode_udp_datagram(UdpPacket(1, 1, "356307042441013", AvlPacket("8E", (rec,))))


def test_imei_round_trip():
    assert encode_imei("356307042441013") == bytes.fromhex("000f333536333037303432343431303133")
    assert decode_imei(encode_imei("356307042441013")) == "356307042441013"


@pytest.mark.parametrize(
    ("data", "error", "field", "offset"),
    [
        (b"", Truncated, "imei_length", 0),
        (b"\x00", Truncated, "imei_length", 1),
        (b"\x00\x00", MalformedImei, "imei_length", 0),
        (b"\x00\x21" + b"1" * 33, MalformedImei, "imei_length", 0),
        (b"\x00\x10" + b"1" * 16, MalformedImei, "imei_length", 0),
        (b"\x00\x0f35630704244101", Truncated, "imei", 16),
        (b"\x00\x0f3563070424410x3", MalformedImei, "imei", 15),
        (b"\x00\x0f35a", MalformedImei, "imei", 4),
        (b"\x00\x0f3563070424410133", MalformedImei, "imei", 17),
    ],
)
def test_imei_errors(data, error, field, offset):
    with pytest.raises(error) as info:
        decode_imei(data)
    assert info.value.field == field
    assert info.value.offset == offset
    if error is MalformedImei:
        assert info.value.fatal
