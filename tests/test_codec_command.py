"""Codec 12 / 13 / 14 messages."""

from __future__ import annotations

import pytest

from teltonika_ingest.codec import (
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    CommandMessage,
    CrcMismatch,
    Malformed,
    UnknownCodec,
    crc16_ibm,
    decode_command_data,
    decode_command_frame,
    encode_command,
    encode_command_data,
    encode_command_message,
    encode_imei_bcd,
    wrap_frame,
)

IMEI = "352093081452251"


def test_encode_command_codec12_matches_vendor_example():
    assert encode_command(b"getinfo") == bytes.fromhex(
        "000000000000000f0c010500000007676574696e666f0100004312"
    )
    assert encode_command("getinfo", codec="12") == encode_command(b"getinfo")


def test_encode_command_codec14_matches_vendor_example():
    assert encode_command(b"getver", codec="14", imei=IMEI) == bytes.fromhex(
        "00000000000000160e01050000000e0352093081452251676574766572010000d2c1"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codec": "14"}, "IMEI"),
        ({"codec": "14", "imei": "12345"}, "15 decimal digits"),
        ({"codec": "14", "imei": "35209308145225x"}, "15 decimal digits"),
        ({"codec": "13"}, "codec 12 or 14"),
        ({"codec": "8"}, "codec 12 or 14"),
    ],
)
def test_encode_command_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_command(b"getver", **kwargs)


def test_encode_command_rejects_non_ascii_text():
    with pytest.raises(UnicodeEncodeError):
        encode_command("gétver")


def test_imei_bcd():
    assert encode_imei_bcd(IMEI) == bytes.fromhex("0352093081452251")


def test_binary_payload_round_trip():
    msg = CommandMessage("12", TYPE_RESPONSE, bytes(range(256)))
    decoded = decode_command_frame(encode_command_message(msg))
    assert decoded == msg
    assert "\ufffd" in decoded.text  # bytes above 0x7f are replaced, never raise


def test_codec13_timestamp_and_size():
    msg = CommandMessage("13", TYPE_COMMAND, b"Hello", timestamp_ms=1563778920000)
    data = encode_command_data(msg)
    assert int.from_bytes(data[3:7], "big") == 4 + 5
    assert decode_command_data(data) == msg


def test_codec13_type_06_is_accepted_like_05():
    # The vendor's older Codec 13 description says the device always sends type 0x06; its
    # newer example shows 0x05; independent device captures use 0x06. This one is from
    # a device log (CRC valid): "hello lets test\r\n" at 2023-08-25T04:48:01Z.
    capture = bytes.fromhex(
        "000000000000001d0d01060000001564e8328168656c6c6f206c65747320746573740d0a0100003548"
    )
    assert decode_command_frame(capture) == CommandMessage(
        "13", TYPE_RESPONSE, b"hello lets test\r\n", timestamp_ms=1692938881000
    )
    for msg_type in (TYPE_COMMAND, TYPE_RESPONSE):
        msg = CommandMessage("13", msg_type, b"Hello", timestamp_ms=1563778920000)
        assert decode_command_frame(encode_command_message(msg)) == msg


def test_codec14_nack_carries_only_the_imei():
    msg = CommandMessage("14", TYPE_NACK, b"", IMEI)
    data = encode_command_data(msg)
    assert data == bytes.fromhex("0e011100000008035209308145225101")
    assert decode_command_data(data) == msg
    longer = data[:3] + (9).to_bytes(4, "big") + data[7:-1] + b"x" + data[-1:]
    with pytest.raises(Malformed) as info:
        decode_command_data(longer)
    assert info.value.field == "size"


def test_quantity2_is_not_checked():
    # Vendor: "This byte will not be parsed but it's recommended that it should
    # contain same value as Command/Response Quantity 1."
    data = encode_command_data(CommandMessage("12", TYPE_RESPONSE, b"OK"))
    assert decode_command_data(data[:-1] + b"\x00") == CommandMessage("12", TYPE_RESPONSE, b"OK")


@pytest.mark.parametrize(
    ("hexdata", "field"),
    [
        ("0c020500000002414201", "quantity_1"),  # two messages in one frame
        ("0c000500000002414201", "quantity_1"),
        ("0c011100000002414201", "type"),  # nACK is Codec 14 only
        ("0d011100000006000000014142" + "01", "type"),  # Codec 13 is type 05 or 06
        ("0c010500000003414201", "size"),  # size past quantity 2
        ("0c010500000001414201", "size"),  # gap before quantity 2
        ("0d010500000002414201", "size"),  # Codec 13 size below 4
        ("0e010500000004414243440101", "size"),  # Codec 14 size below 8
        ("0e01050000000913520930814522514101", "imei"),  # not 0 + 15 digits
        ("0e0105000000080a5209308145225101", "imei"),
        ("0c0105000000", "data"),
        ("", "codec_id"),
    ],
)
def test_malformed(hexdata, field):
    with pytest.raises(Malformed) as info:
        decode_command_data(bytes.fromhex(hexdata), offset_base=8)
    assert info.value.field == field
    assert info.value.offset is not None and info.value.offset >= 8


def test_avl_codec_is_not_a_command():
    with pytest.raises(UnknownCodec):
        decode_command_data(bytes.fromhex("080000"))
    with pytest.raises(UnknownCodec):
        decode_command_frame(wrap_frame(bytes.fromhex("990000")))


def test_frame_crc_checked():
    frame = bytearray(encode_command(b"getinfo"))
    frame[12] ^= 1
    with pytest.raises(CrcMismatch) as info:
        decode_command_frame(bytes(frame))
    assert info.value.actual == crc16_ibm(bytes(frame[8:-4]))


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (CommandMessage("8", TYPE_COMMAND, b""), "not a command codec"),
        (CommandMessage("12", TYPE_NACK, b""), "not a Codec 12 message type"),
        (CommandMessage("13", TYPE_COMMAND, b""), "timestamp"),
        (CommandMessage("13", TYPE_COMMAND, b"", timestamp_ms=1500), "whole seconds"),
        (CommandMessage("13", TYPE_COMMAND, b"", timestamp_ms=2**32 * 1000), "uint32"),
        (CommandMessage("14", TYPE_COMMAND, b""), "IMEI"),
        (CommandMessage("14", TYPE_NACK, b"x", IMEI), "nACK"),
    ],
)
def test_encode_command_message_rejects(msg, message):
    with pytest.raises(ValueError, match=message):
        encode_command_message(msg)
