"""Every frame of tests/data/teltonika-spec-vectors.json decodes to exactly the expected
values, through the whole-buffer decoders and through the Framer, and re-encodes to
the same bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from teltonika_ingest.codec import (
    AvlFrame,
    CommandFrame,
    CommandMessage,
    Framer,
    Handshake,
    ack_bytes,
    decode_avl_data,
    decode_avl_frame,
    decode_command_frame,
    decode_imei,
    decode_udp_datagram,
    encode_avl_data,
    encode_avl_frame,
    encode_command_message,
    encode_imei,
    encode_udp_ack,
    encode_udp_datagram,
    format_timestamp,
    record_attributes,
    record_payload,
)

VECTORS_PATH = Path(__file__).parent / "data" / "teltonika-spec-vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]


def by_kind(*kinds: str) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] in kinds]


def expected_record_shape(record, codec: str) -> dict[str, Any]:
    """The vector's record shape: the payload minus device_id, received_at and codec,
    and minus generation_type for codecs other than 16."""
    payload = orjson.loads(
        record_payload(record, "356307042441013", codec, "2026-11-22T10:00:00.123Z")
    )
    del payload["device_id"], payload["received_at"], payload["codec"]
    # the quality flags (contract.md section 8) are not in the vector file; their own tests
    # are in test_codec_payload.py
    assert isinstance(payload.pop("gps_valid"), bool)
    assert isinstance(payload.pop("time_valid"), bool)
    if codec != "16":
        assert payload.pop("generation_type") is None
    return payload


def test_vector_file_covers_every_kind():
    kinds = {v["kind"] for v in VECTORS}
    assert kinds == {"imei", "avl", "command", "response", "udp"}
    assert {v["expect"]["codec"] for v in VECTORS if v["kind"] == "avl"} == {"8", "8E", "16"}
    assert {v["expect"]["codec"] for v in VECTORS if v["kind"] in ("command", "response")} == {
        "12",
        "13",
        "14",
    }


@pytest.mark.parametrize("vector", by_kind("imei"))
def test_imei_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    assert decode_imei(raw) == vector["expect"]["imei"]
    assert encode_imei(vector["expect"]["imei"]) == raw


@pytest.mark.parametrize("vector", by_kind("avl"))
def test_avl_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    expect = vector["expect"]
    packet = decode_avl_frame(raw)
    assert packet.codec == expect["codec"]
    assert len(packet.records) == expect["ack"]
    assert ack_bytes(len(packet.records)) == expect["ack"].to_bytes(4, "big")
    assert [expected_record_shape(r, packet.codec) for r in packet.records] == expect["records"]
    for record, want in zip(packet.records, expect["records"], strict=True):
        assert record_attributes(record) == want["attributes"]
        assert format_timestamp(record.timestamp_ms) == want["timestamp"]
    assert encode_avl_frame(packet) == raw
    assert encode_avl_data(packet) == raw[8:-4]
    assert decode_avl_data(raw[8:-4]) == packet


def check_command(message: CommandMessage, expect: dict[str, Any]) -> None:
    assert message.codec == expect["codec"]
    assert message.type == expect["type"]
    assert message.text == expect["text"]
    assert message.imei == expect.get("imei")
    if "timestamp" in expect:
        assert message.timestamp_ms is not None
        assert format_timestamp(message.timestamp_ms) == expect["timestamp"]
    else:
        assert message.timestamp_ms is None


@pytest.mark.parametrize("vector", by_kind("command", "response"))
def test_command_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    message = decode_command_frame(raw)
    check_command(message, vector["expect"])
    assert encode_command_message(message) == raw


@pytest.mark.parametrize("vector", by_kind("udp"))
def test_udp_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    expect = vector["expect"]
    datagram = decode_udp_datagram(raw)
    assert datagram.imei == expect["imei"]
    assert datagram.packet_id == expect["packet_id"]
    assert datagram.avl_packet_id == expect["avl_packet_id"]
    assert datagram.packet.codec == expect["codec"]
    shapes = [expected_record_shape(r, datagram.packet.codec) for r in datagram.packet.records]
    assert shapes == expect["records"]
    ack = encode_udp_ack(datagram.packet_id, datagram.avl_packet_id, len(datagram.packet.records))
    assert ack.hex() == expect["ack_hex"]
    assert encode_udp_datagram(datagram) == raw


def test_all_tcp_vectors_through_one_framer():
    framer = Framer()
    stream = b"".join(
        bytes.fromhex(v["hex"])
        for v in VECTORS
        if v["kind"] in ("imei", "avl", "command", "response")
    )
    framer.feed(stream)
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    tcp = [v for v in VECTORS if v["kind"] in ("imei", "avl", "command", "response")]
    assert len(events) == len(tcp)
    for event, vector in zip(events, tcp, strict=True):
        raw = bytes.fromhex(vector["hex"])
        if vector["kind"] == "imei":
            assert event == Handshake(vector["expect"]["imei"])
        elif vector["kind"] == "avl":
            assert isinstance(event, AvlFrame)
            assert event.raw == raw
            assert event.packet == decode_avl_frame(raw)
        else:
            assert isinstance(event, CommandFrame)
            assert event.raw == raw
            check_command(event.message, vector["expect"])
    assert framer.buffered == 0
    assert not framer.failed
