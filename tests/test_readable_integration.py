"""Readable telemetry through the real service (contract.md section 8): the data-quality
flags in every payload, at their edges, over TCP (the compiled path) and UDP (the Python
path), counted in teltonika_records_flagged_total and never dropping a record."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import pytest_twisted
from test_udp import _Client, free_udp_port
from twisted.internet import defer, reactor

from teltonika_ingest.codec import (
    AvlPacket,
    UdpPacket,
    accel,
    encode_avl_frame,
    encode_udp_datagram,
)

from device import wait_for
from redisproc import RedisProcess
from support import make_record
from test_service_integration import IMEI, ack, start, stream_entries

pytestmark = pytest.mark.integration

Y2010 = 1262304000000  # 2010-01-01T00:00:00.000Z


def edge_records(now_ms: int, window_s: int) -> list[tuple[dict[str, int], bool, bool]]:
    """(record fields, gps_valid, time_valid). The future edge is checked with a minute of
    margin on each side: received_at is the service's clock when the frame arrives, a few
    milliseconds after ``now_ms`` (the exact millisecond edges are in test_codec_payload)."""
    window = window_s * 1000
    return [
        ({"timestamp_ms": now_ms - 60_000}, True, True),
        ({"timestamp_ms": now_ms - 60_000, "satellites": 0}, False, True),
        ({"timestamp_ms": now_ms - 60_000, "longitude": 0, "latitude": 0}, False, True),
        ({"timestamp_ms": now_ms - 60_000, "longitude": 0}, True, True),
        ({"timestamp_ms": 0}, True, False),
        ({"timestamp_ms": Y2010 - 1}, True, False),
        ({"timestamp_ms": Y2010}, True, True),
        ({"timestamp_ms": now_ms + window - 60_000}, True, True),
        ({"timestamp_ms": now_ms + window + 60_000}, True, False),
        ({"timestamp_ms": 0, "satellites": 0}, False, False),
    ]


def packet_of(cases: list[tuple[dict[str, int], bool, bool]]) -> AvlPacket:
    return AvlPacket("8E", tuple(make_record(i, **fields) for i, (fields, _, _) in
                                 enumerate(cases)))  # fmt: skip


def check_stream(redis_proc: RedisProcess, cases: list[tuple[dict[str, int], bool, bool]]) -> None:
    entries = stream_entries(redis_proc)
    assert len(entries) == len(cases)  # nothing dropped for a flag
    for entry, (_, gps, time_ok) in zip(entries, cases, strict=True):
        payload = orjson.loads(entry["payload"])
        assert (payload["gps_valid"], payload["time_valid"]) == (gps, time_ok), payload
        assert payload["attributes"]  # unchanged, raw
        assert "io" not in payload  # --io-names is off


@pytest.mark.parametrize("window", [600, 3600])
@pytest_twisted.ensureDeferred
async def test_flags_over_tcp_at_their_edges(
    redis_proc: RedisProcess, tmp_path: Path, window: int
) -> None:
    assert accel.payload_parts is not None  # this is the compiled path's test
    running = await start(redis_proc, tmp_path, "--time-valid-window", str(window))
    try:
        dev = await running.device()
        cases = edge_records(time.time_ns() // 1_000_000, window)
        dev.send(encode_avl_frame(packet_of(cases)))
        assert await dev.expect(4) == ack(len(cases))  # every record ACKed
        check_stream(redis_proc, cases)
        gps_bad = sum(not gps for _, gps, _ in cases)
        time_bad = sum(not t for _, _, t in cases)
        assert running.sample("teltonika_records_flagged_total", flag="gps_valid") == gps_bad
        assert running.sample("teltonika_records_flagged_total", flag="time_valid") == time_bad
        assert running.sample("teltonika_records_total", codec="8E") == len(cases)
        text = await running.metrics()
        assert f'teltonika_records_flagged_total{{flag="gps_valid"}} {gps_bad}.0' in text
        await dev.close()
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_flags_over_udp_the_python_path(redis_proc: RedisProcess, tmp_path: Path) -> None:
    port = free_udp_port()
    running = await start(
        redis_proc, tmp_path, "--udp-port", str(port), "--udp-interface", "127.0.0.1"
    )
    client = _Client()
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        cases = edge_records(time.time_ns() // 1_000_000, 600)
        datagram = encode_udp_datagram(UdpPacket(1, 7, IMEI, packet_of(cases)))
        client_port.write(datagram, ("127.0.0.1", port))
        await wait_for(lambda: len(client.replies) == 1)
        check_stream(redis_proc, cases)
        assert running.sample("teltonika_records_flagged_total", flag="gps_valid") == 3
        assert running.sample("teltonika_records_flagged_total", flag="time_valid") == 4
    finally:
        await defer.maybeDeferred(client_port.stopListening)
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_flagged_counts_only_what_redis_has(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """A packet that is not published (Redis gone) is not ACKed and not counted; the device
    resends it once Redis is back, and it is counted once, when it is in the stream."""
    running = await start(redis_proc, tmp_path)
    frame = encode_avl_frame(packet_of([({"timestamp_ms": 0}, True, False)]))
    try:
        dev = await running.device()
        redis_proc.stop()
        dev.send(frame)
        await wait_for(lambda: dev.closed.called, timeout=10)  # publish failed: closed, no ACK
        assert dev.received == b""
        assert running.sample("teltonika_records_flagged_total", flag="time_valid") == 0
        redis_proc.start()
        await wait_for(lambda: running.svc.redis.connected, timeout=10)
        again = await running.device()
        again.send(frame)
        assert await again.expect(4) == ack(1)
        assert running.sample("teltonika_records_flagged_total", flag="time_valid") == 1
        assert running.sample("teltonika_records_flagged_total", flag="gps_valid") == 0
        await again.close()
    finally:
        await running.svc.stopService()


# --------------------------------------------------------------------------- --io-names

HASH_IMEI = "354017118537444"  # TAT100 in the Redis hash
FILE_IMEI = "352093081452251"  # FMB640 in the allow-list file
DEFAULT_IMEI = "356307042441013"  # no model anywhere: --default-model FMB920
UNKNOWN_IMEI = "352093086403655"  # "FMX999" in the hash: not in the catalogue


def named_record() -> AvlPacket:
    record = make_record(
        0,
        timestamp_ms=time.time_ns() // 1_000_000 - 5_000,
        io1={239: 1, 113: 87},
        io2={66: 12520, 17: (1 << 16) - 981, 65000: 7},
        io4={},
        io8={},
    )
    return AvlPacket("8E", (record,))


RAW = {"239": 1, "113": 87, "66": 12520, "17": 64555, "65000": 7}
SCRIPT = Path(sys.executable).parent / "teltonika-ingest"


def cli_io(*args: str) -> dict:
    out = subprocess.run(
        [str(SCRIPT), "decode", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    (line,) = out.splitlines()
    payload = orjson.loads(line)
    assert payload["attributes"] == RAW
    return payload["io"]


async def named_payload(running, redis_proc: RedisProcess, imei: str) -> dict:
    before = len(stream_entries(redis_proc))
    dev = await running.device(imei)
    dev.send(encode_avl_frame(named_record()))
    assert await dev.expect(4) == ack(1)
    await dev.close()
    (entry,) = stream_entries(redis_proc)[before:]
    payload = orjson.loads(entry["payload"])
    assert payload["device_id"] == imei
    assert payload["attributes"] == RAW  # raw, exactly as without --io-names
    assert (payload["gps_valid"], payload["time_valid"]) == (True, True)
    assert list(payload)[-1] == "io"
    return payload["io"]


@pytest_twisted.ensureDeferred
async def test_io_names_per_model_from_every_source(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text(
        f"{HASH_IMEI} FMB920   # the hash wins over the file\n{FILE_IMEI} FMB640\n"
        f"{DEFAULT_IMEI}\n{UNKNOWN_IMEI}\n"
    )
    redis_proc.cmd("HSET", "devices:model", HASH_IMEI, "TAT100", UNKNOWN_IMEI, "FMX999")
    running = await start(
        redis_proc, tmp_path, "--io-names", "--allow-list", str(allow),
        "--default-model", "fmb920",
    )  # fmt: skip
    try:
        tat = await named_payload(running, redis_proc, HASH_IMEI)
        assert tat["external_voltage"] == {"id": 66, "value": 12.52, "unit": "V"}
        assert tat["axis_x"] == {"id": 17, "value": -0.981, "unit": "G"}
        assert tat["battery_level"] == {"id": 113, "value": 87, "unit": "%"}
        assert tat["ignition"] == {"id": 239, "value": 1, "text": "Ignition On"}
        assert 65000 not in {e["id"] for e in tat.values()}  # unknown id: raw only

        fmx640 = await named_payload(running, redis_proc, FILE_IMEI)
        assert fmx640["external_voltage"] == {"id": 66, "value": 12520, "unit": "mV"}
        assert fmx640["service_distance"] == {"id": 113, "value": 87, "unit": "km"}
        assert fmx640["fuel_consumed_counted"]["id"] == 17

        fmb920 = await named_payload(running, redis_proc, DEFAULT_IMEI)
        assert fmb920["external_voltage"] == {"id": 66, "value": 12.52, "unit": "V"}
        assert fmb920["axis_x"] == {"id": 17, "value": -981, "unit": "mG"}

        unknown = await named_payload(running, redis_proc, UNKNOWN_IMEI)
        assert unknown == {"ignition": {"id": 239, "value": 1, "text": "Ignition On"}}
        assert running.sample("teltonika_model_lookup_failures_total") == 0

        # `decode --names` names the same frame as the stream does, model for model
        frame = encode_avl_frame(named_record()).hex()
        for model, streamed in (("TAT100", tat), ("FMB640", fmx640), ("FMB920", fmb920)):
            decoded = cli_io("--names", "--model", model, frame)
            assert decoded == streamed, model
        assert cli_io("--names", frame) == unknown
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_io_names_when_the_model_hash_cannot_be_read(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """The hash lookup fails (here: the key holds a string, so HGET answers WRONGTYPE): the
    record is published and ACKed all the same, named by --default-model, and the failure
    is counted."""
    redis_proc.cmd("SET", "devices:model", "not a hash")
    running = await start(redis_proc, tmp_path, "--io-names", "--default-model", "TAT100")
    try:
        io = await named_payload(running, redis_proc, DEFAULT_IMEI)
        assert io["axis_x"] == {"id": 17, "value": -0.981, "unit": "G"}  # TAT100's meaning
        assert running.sample("teltonika_model_lookup_failures_total") == 1
        assert "teltonika_model_lookup_failures_total 1.0" in await running.metrics()
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_io_names_over_udp(redis_proc: RedisProcess, tmp_path: Path) -> None:
    port = free_udp_port()
    redis_proc.cmd("HSET", "devices:model", HASH_IMEI, "TAT100")
    running = await start(
        redis_proc, tmp_path, "--io-names", "--udp-port", str(port),
        "--udp-interface", "127.0.0.1",
    )  # fmt: skip
    client = _Client()
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        client_port.write(
            encode_udp_datagram(UdpPacket(1, 7, HASH_IMEI, named_record())), ("127.0.0.1", port)
        )
        await wait_for(lambda: len(client.replies) == 1)
        (entry,) = stream_entries(redis_proc)
        payload = orjson.loads(entry["payload"])
        assert payload["attributes"] == RAW
        assert payload["io"]["external_voltage"] == {"id": 66, "value": 12.52, "unit": "V"}
    finally:
        await defer.maybeDeferred(client_port.stopListening)
        await running.svc.stopService()
