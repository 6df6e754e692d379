"""The device simulator and replay: unit checks, a fake server for the failure paths, and
small runs against the real service (in-process, and as a ``twistd`` process through the
console script). Large runs are benchmarks (bench/), not tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from teltonika_ingest.codec import (
    CODEC_12,
    CODEC_14,
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    CommandMessage,
    decode_avl_frame,
    decode_command_frame,
    decode_udp_datagram,
    encode_command,
)
from teltonika_ingest.codec.imei import luhn_digit
from teltonika_ingest.config import Config
from teltonika_ingest.server.tap import IngestService
from teltonika_ingest.sim.devices import answer_command, default_answer
from teltonika_ingest.sim.replay import parse_replay, replay
from teltonika_ingest.sim.simulation import Simulation
from teltonika_ingest.sim.stats import LatencyHistogram, merge_summaries
from teltonika_ingest.sim.traffic import (
    FrameTemplate,
    SimConfig,
    UdpTemplate,
    build_packet,
    imei_for,
    source_address,
)

from device import wait_for
from redisproc import RedisProcess, free_port
from support import VECTORS, vector_bytes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMEI_BASE = 35_000_000_000_000


def ack(n: int) -> bytes:
    return struct.pack(">I", n)


# --------------------------------------------------------------------------- pure parts


def test_imeis_are_15_digits_with_a_luhn_check_digit() -> None:
    assert luhn_digit("35630704244101") == 3  # the vendor's example IMEI 356307042441013
    imeis = [imei_for(IMEI_BASE, i) for i in range(100)]
    assert len(set(imeis)) == 100
    for imei in imeis:
        assert len(imei) == 15 and imei.isdigit()
        assert int(imei[-1]) == luhn_digit(imei[:14])


@pytest.mark.parametrize("codec", ["8", "8E", "16"])
def test_frame_template_stamps_timestamps_and_crc(codec: str) -> None:
    packet = build_packet(codec, 10, 22, random.Random(3))
    template = FrameTemplate(packet)
    first = template.build(1_700_000_000_000)
    second = template.build(1_700_000_000_500)
    for frame, start in ((first, 1_700_000_000_000), (second, 1_700_000_000_500)):
        decoded = decode_avl_frame(frame)  # CRC checked
        assert decoded.codec == codec
        assert [r.timestamp_ms for r in decoded.records] == [start + i for i in range(10)]
        for got, want in zip(decoded.records, packet.records, strict=True):
            assert got.io1 == want.io1 and got.io8 == want.io8 and got.longitude == want.longitude
            assert sum(map(len, (got.io1, got.io2, got.io4, got.io8))) == 22
    assert first != second and len(first) == template.size


def test_udp_template_stamps_ids_and_timestamps() -> None:
    imei = imei_for(IMEI_BASE, 7)
    template = UdpTemplate(build_packet("8E", 3, 22, random.Random(1)), imei)
    datagram = decode_udp_datagram(template.build(1_700_000_000_000, 0x1234, 0x56))
    assert (datagram.packet_id, datagram.avl_packet_id, datagram.imei) == (0x1234, 0x56, imei)
    stamps = [r.timestamp_ms for r in datagram.packet.records]
    assert stamps == [1_700_000_000_000 + i for i in range(3)]


def test_latency_histogram_quantiles_and_merge() -> None:
    hist = LatencyHistogram()
    for us in range(1, 1001):  # 1 µs .. 1 ms
        hist.add(us / 1e6)
    assert hist.quantile_us(0.5) == 500
    assert hist.quantile_us(0.99) == 990
    assert hist.max_us == 1000
    other = LatencyHistogram()
    for _ in range(1000):
        other.add(0.0123456)  # 12.3456 ms -> bucket 12300..12399 µs
    hist.merge(LatencyHistogram.from_json(json.loads(json.dumps(other.to_json()))))
    assert hist.n == 2000
    assert hist.quantile_us(0.25) == 500
    assert 12345 <= hist.quantile_us(0.99) <= 12399  # top of the bucket, capped by the max
    summary = hist.summary_ms()
    assert summary["count"] == 2000 and summary["max"] == pytest.approx(12.345)


def test_merge_summaries_adds_counts_and_merges_latencies() -> None:
    def part(acked: int, latency_s: float, errors: dict[str, int]) -> dict[str, Any]:
        hist = LatencyHistogram()
        for _ in range(acked):
            hist.add(latency_s)
        counts = dict.fromkeys(("connects", "reconnects", "handshakes", "packets_sent",
                                "records_sent", "resends", "records_acked", "late_sends",
                                "commands_received", "commands_answered"), 0)  # fmt: skip
        return {
            **counts, "packets_acked": acked, "devices": 10, "window_packets_acked": acked,
            "window_records_acked": acked, "connected_at_end": 10,
            "errors_total": sum(errors.values()),
            "packets_per_s": acked / 2.0, "records_per_s": acked / 2.0, "elapsed_s": 2.0,
            "window_s": 2.0, "incomplete": False, "processes": 1, "frame_bytes": [100],
            "errors": errors, "histogram": hist.to_json(), "steady_histogram": hist.to_json(),
        }  # fmt: skip

    merged = merge_summaries([part(100, 0.001, {"ack_timeout": 1}), part(100, 0.003, {})])
    assert merged["packets_acked"] == 200 and merged["devices"] == 20
    assert merged["processes"] == 2 and merged["records_per_s"] == 100.0
    assert merged["errors"] == {"ack_timeout": 1} and merged["errors_total"] == 1
    assert merged["ack_latency_ms"]["p50"] == pytest.approx(1.0, abs=0.011)
    assert merged["ack_latency_ms"]["p99"] == pytest.approx(3.0, abs=0.031)


def test_device_answers_commands() -> None:
    imei = imei_for(IMEI_BASE, 0)
    c12 = answer_command(CommandMessage(CODEC_12, TYPE_COMMAND, b"getver"), imei, default_answer)
    assert c12 is not None
    reply = decode_command_frame(c12)
    assert (reply.codec, reply.type) == (CODEC_12, TYPE_RESPONSE)
    assert reply.text.startswith("Ver:") and imei in reply.text
    own = CommandMessage(CODEC_14, TYPE_COMMAND, b"setdigout 1", imei)
    reply14 = decode_command_frame(answer_command(own, imei, default_answer) or b"")
    assert (reply14.type, reply14.imei, reply14.text) == (TYPE_RESPONSE, imei, "setdigout 1: OK")
    other = CommandMessage(CODEC_14, TYPE_COMMAND, b"getver", "356307042441013")
    nack = decode_command_frame(answer_command(other, imei, default_answer) or b"")
    assert (nack.type, nack.imei, nack.payload) == (TYPE_NACK, imei, b"")
    response = CommandMessage(CODEC_12, TYPE_RESPONSE, b"x")
    assert answer_command(response, imei, default_answer) is None


def test_parse_replay_lines() -> None:
    frame = vector_bytes(next(v["name"] for v in VECTORS if v["kind"] == "avl"))
    count = frame[9]
    text = "\n".join(
        [
            "# field capture, FMB920",
            "",
            "000F333536333037303432343431303133",
            frame.hex(),
            " ".join(f"{b:02X}" for b in frame),  # spaced upper-case bytes
            f"2024-01-01 10:00:01  INFO: [T0a: teltonika < 10.0.0.1] {frame.hex()}",
            "2024-01-01 10:00:01  INFO: [T0a: teltonika > 10.0.0.1] 0000000" + str(count),
            "ff" + frame.hex() + frame.hex(),  # keep-alive and two frames in one read
            "00000000000000ff0c01",  # truncated
        ]
    )
    items = parse_replay(text)
    assert [i.line for i in items] == [3, 4, 5, 6, 8, 9]
    assert items[0].expects == (("handshake",),) and "356307042441013" in items[0].what
    assert items[1].expects == (("ack", count),) and items[1].data == frame
    assert items[2].data == frame and items[3].data == frame
    assert items[4].expects == (("ack", count), ("ack", count))
    assert items[4].what.startswith("keep-alive, Codec")
    assert items[5].expects == (("any",),)
    with pytest.raises(ValueError, match="line 2"):
        parse_replay("000F\nnot hex at all")


# --------------------------------------------------------------------------- fake server


class _Box:
    """What a fake server saw, and how it answers frame number n (0-based)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.frames: list[bytes] = []
        self.connections = 0
        self.protocols: list[_FakeServer] = []
        self.peers: list[str] = []  # source address of each connection


class _FakeServer(protocol.Protocol):
    box: _Box

    def connectionMade(self) -> None:
        self.buf = b""
        self.handshaken = False
        self.box.connections += 1
        self.box.protocols.append(self)
        self.box.peers.append(self.transport.getPeer().host)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            if not self.handshaken:
                if len(self.buf) < 17:
                    return
                self.buf = self.buf[17:]
                self.handshaken = True
                self.transport.write(b"\x01")  # type: ignore[union-attr]
                continue
            if len(self.buf) < 12:
                return
            size = 12 + int.from_bytes(self.buf[4:8], "big")
            if len(self.buf) < size:
                return
            frame, self.buf = self.buf[:size], self.buf[size:]
            index = len(self.box.frames)
            self.box.frames.append(frame)
            self.box.answer(self, index, frame)


@pytest.fixture
def fake_server() -> Iterator[Any]:
    ports = []

    def start(answer: Any) -> tuple[_Box, int]:
        box = _Box(answer)
        factory = protocol.Factory.forProtocol(_FakeServer)
        factory.noisy = False
        _FakeServer.box = box
        listen: Any = reactor.listenTCP
        port = listen(0, factory, interface="127.0.0.1")
        ports.append(port)
        return box, port.getHost().port

    yield start
    for port in ports:
        port.stopListening()


def _ack_all(proto: _FakeServer, index: int, frame: bytes) -> None:
    proto.transport.write(ack(frame[9]))  # type: ignore[union-attr]


def _silent_first(proto: _FakeServer, index: int, frame: bytes) -> None:
    if index:
        _ack_all(proto, index, frame)


def _wrong_count_first(proto: _FakeServer, index: int, frame: bytes) -> None:
    proto.transport.write(ack(frame[9] + (1 if index == 0 else 0)))  # type: ignore[union-attr]


def _close_on_first(proto: _FakeServer, index: int, frame: bytes) -> None:
    if index == 0:
        proto.transport.loseConnection()  # type: ignore[union-attr]
    else:
        _ack_all(proto, index, frame)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_silent_first, "ack_timeout"),
        (_wrong_count_first, "ack_count_mismatch"),
        (_close_on_first, "closed_awaiting_ack"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_resend_after_missing_ack(fake_server: Any, answer: Any, error: str) -> None:
    box, port = fake_server(answer)
    config = SimConfig(
        port=port, devices=1, records=3, packets=2, ack_timeout=0.3, reconnect_delay=0.05,
        max_time=20,
    )  # fmt: skip
    summary = await Simulation(config).run()
    first, resent, second = box.frames  # the same packet twice, byte for byte, then the next
    assert resent == first and second != first
    assert box.connections == 2
    assert summary["packets_acked"] == 2 and summary["records_acked"] == 6
    assert summary["packets_sent"] == 3 and summary["resends"] == 1
    assert summary["reconnects"] == 1
    assert summary["errors"] == {error: 1}
    assert not summary["incomplete"]


@pytest_twisted.ensureDeferred
async def test_devices_spread_over_source_addresses(fake_server: Any) -> None:
    box, port = fake_server(_ack_all)
    config = SimConfig(port=port, devices=5, records=1, packets=1, source_addresses=2, max_time=20)
    summary = await Simulation(config).run()
    assert summary["packets_acked"] == 5
    # device i binds 127.0.1.(1 + i % 2); the connection order is the start order
    assert sorted(box.peers) == ["127.0.1.1"] * 3 + ["127.0.1.2"] * 2
    assert [source_address(n) for n in (0, 253, 254, 64515)] == [
        "127.0.1.1",
        "127.0.1.254",
        "127.0.2.1",
        "127.0.254.254",
    ]
    with pytest.raises(ValueError, match="only for a 127"):
        SimConfig(host="192.0.2.1", devices=1, packets=1, source_addresses=2).validate()


@pytest_twisted.ensureDeferred
async def test_source_address_sockets_take_their_port_at_connect(fake_server: Any) -> None:
    """IP_BIND_ADDRESS_NO_PORT: bound to the address, the port chosen by connect() for the
    (source, destination) pair, so a previous run's TIME_WAIT ports do not starve bind()."""
    from teltonika_ingest.sim.devices import IP_BIND_ADDRESS_NO_PORT, _SourceAddressConnector

    _box, port = fake_server(_ack_all)
    made: defer.Deferred[Any] = defer.Deferred()

    class Once(protocol.ClientFactory):
        def buildProtocol(self, addr: Any) -> protocol.Protocol:
            proto = protocol.Protocol()
            reactor.callLater(0, made.callback, proto)
            return proto

    connector = _SourceAddressConnector("127.0.0.1", port, Once(), 5, ("127.0.1.7", 0), reactor)
    connector.connect()
    proto = await made
    try:
        skt = proto.transport.getHandle()  # type: ignore[union-attr]
        assert skt.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
        assert skt.getsockname()[0] == "127.0.1.7"
    finally:
        connector.disconnect()


@pytest_twisted.ensureDeferred
async def test_command_frame_between_packets_is_answered_not_taken_for_an_ack(
    fake_server: Any,
) -> None:
    """A Codec 12 command written while the device waits for its ACK (the server sent it
    when idle, the packet crossed it) is answered; the ACK that follows still counts."""
    answered: list[CommandMessage] = []
    command = encode_command("getinfo")

    def answer(proto: _FakeServer, index: int, frame: bytes) -> None:
        if index == 0:
            proto.transport.write(command + ack(frame[9]))  # type: ignore[union-attr]
        elif frame[8] == 0x0C:
            answered.append(decode_command_frame(frame))
        else:
            _ack_all(proto, index, frame)

    box, port = fake_server(answer)
    seen: list[tuple[str, str]] = []
    config = SimConfig(port=port, devices=1, records=2, packets=2, answer_commands=True)
    sim = Simulation(config, on_command=lambda imei, m: seen.append((imei, m.text)))
    summary = await sim.run()
    assert summary["packets_acked"] == 2 and summary["errors"] == {}
    assert summary["commands_received"] == 1 and summary["commands_answered"] == 1
    assert seen == [(imei_for(IMEI_BASE, 0), "getinfo")]
    assert [m.text[:4] for m in answered] == ["RTC:"]
    assert len(box.frames) == 3


# --------------------------------------------------------------------------- real service


class Running:
    def __init__(self, svc: IngestService, port: int, udp_port: int | None) -> None:
        self.svc = svc
        self.port = port
        self.udp_port = udp_port


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.async_yield_fixture
async def service(redis_session: RedisProcess, tmp_path: Path) -> AsyncIterator[Running]:
    udp_port = _free_udp_port()
    config = Config.from_args(
        [
            "--listen", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
            "--instance-id", "test-sim",
            "--udp-port", str(udp_port),
            "--udp-interface", "127.0.0.1",
        ],
        environ={},
        cwd=tmp_path,
    )  # fmt: skip
    svc = IngestService(config)
    svc.startService()
    device_port, _http = await svc.listening
    await wait_for(lambda: svc.redis.connected)
    yield Running(svc, device_port.getHost().port, udp_port)
    await svc.stopService()


def _stream(redis: RedisProcess) -> list[dict[str, str]]:
    out = []
    for _id, flat in redis.cmd("XRANGE", "telemetry:teltonika", "-", "+"):
        fields = [f.decode() if isinstance(f, bytes) else f for f in flat]
        out.append(dict(zip(fields[0::2], fields[1::2], strict=True)))
    return out


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_simulated_devices_against_the_service(
    service: Running, redis_session: RedisProcess
) -> None:
    config = SimConfig(
        port=service.port, devices=3, records=5, codec="mix", packets=4, ramp_up=0.1, max_time=30
    )
    summary = await Simulation(config).run()
    assert summary["packets_acked"] == 12 and summary["records_acked"] == 60
    assert summary["errors"] == {} and not summary["incomplete"]
    assert summary["ack_latency_ms"]["count"] == 12
    entries = _stream(redis_session)
    assert len(entries) == 60
    imeis = {imei_for(IMEI_BASE, i) for i in range(3)}
    assert {e["imei"] for e in entries} == imeis
    assert {e["codec"] for e in entries} == {"8", "8E", "16"}
    # Each device's records arrive in order, and timestamps never repeat.
    for imei in imeis:
        stamps = [e["ts"] for e in entries if e["imei"] == imei]
        assert stamps == sorted(stamps) and len(set(stamps)) == 20


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_simulated_udp_devices_against_the_service(
    service: Running, redis_session: RedisProcess
) -> None:
    assert service.udp_port is not None
    config = SimConfig(
        udp=True, udp_port=service.udp_port, devices=2, records=3, packets=3, max_time=30
    )
    summary = await Simulation(config).run()
    assert summary["mode"] == "udp"
    assert summary["packets_acked"] == 6 and summary["records_acked"] == 18
    assert summary["errors"] == {}
    assert len(_stream(redis_session)) == 18


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_codec12_command_through_the_service_is_answered(
    service: Running, redis_session: RedisProcess
) -> None:
    imei = imei_for(IMEI_BASE, 0)
    config = SimConfig(
        port=service.port, devices=1, packets=0, duration=30, answer_commands=True, max_time=40
    )
    sim = Simulation(config)
    done = sim.run()
    await wait_for(lambda: redis_session.cmd("HGET", "connections:registry", imei) == "test-sim")
    redis_session.cmd(
        "XADD", "commands:instance:test-sim", "*", "id", "c-1", "imei", imei, "text", "getver"
    )

    def result() -> dict[str, str] | None:
        for _id, flat in redis_session.cmd("XRANGE", "commands:results", "-", "+"):
            fields = [f.decode() if isinstance(f, bytes) else f for f in flat]
            entry = dict(zip(fields[0::2], fields[1::2], strict=True))
            if entry.get("id") == "c-1":
                return entry
        return None

    await wait_for(lambda: result() is not None, timeout=10)
    sim.stop()
    summary = await done
    entry = result()
    assert entry is not None
    assert entry["status"] == "ok" and entry["imei"] == imei
    assert entry["response"].startswith("Ver:") and imei in entry["response"]
    assert summary["commands_received"] == 1 and summary["commands_answered"] == 1


def _replay_file(tmp_path: Path, *extra: str) -> tuple[Path, int]:
    lines = ["# replayed from a device log", "000F333536333037303432343431303133"]
    records = 0
    for v in VECTORS:
        if v["kind"] == "avl":
            lines.append(f"2024-01-01 10:00:00 INFO: [T1: teltonika < 10.0.0.9] {v['hex']}")
            lines.append("2024-01-01 10:00:00 INFO: [T1: teltonika > 10.0.0.9] 00000001")
            records += v["expect"]["ack"]
    path = tmp_path / "capture.log"
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path, records


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_replay_against_the_service(
    service: Running, redis_session: RedisProcess, tmp_path: Path
) -> None:
    path, records = _replay_file(tmp_path)
    items = parse_replay(path.read_text())
    seen: list[dict[str, Any]] = []
    result = await replay(
        items, host="127.0.0.1", port=service.port, imei="x", ack_timeout=5, report=seen.append
    )
    assert result["ok"], result
    assert not result["closed_by_server"]
    assert seen[0]["got"] == "accepted (01)"
    assert all(r["got"].startswith("ACK ") for r in seen[1:])
    entries = _stream(redis_session)
    assert len(entries) == records
    assert {e["imei"] for e in entries} == {"356307042441013"}


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_udp_replay_against_the_service(
    service: Running, redis_session: RedisProcess
) -> None:
    assert service.udp_port is not None
    imei = imei_for(IMEI_BASE, 3)
    template = UdpTemplate(build_packet("16", 2, 10, random.Random(2)), imei)
    lines = [template.build(1_700_000_000_000 + 10 * i, i, i).hex() for i in range(3)]
    result = await replay(
        parse_replay("\n".join(lines), udp=True), host="127.0.0.1", port=service.udp_port,
        imei=imei, udp=True, ack_timeout=5,
    )  # fmt: skip
    assert result["ok"], result
    assert [r["got"] for r in result["results"]] == [
        f"UDP ACK 2 for AVL packet {i}" for i in range(3)
    ]
    assert len(_stream(redis_session)) == 6


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_replay_reports_a_bad_crc_and_the_close(
    service: Running, redis_session: RedisProcess
) -> None:
    good = vector_bytes(next(v["name"] for v in VECTORS if v["kind"] == "avl"))
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    text = "\n".join([good.hex(), bad.hex(), good.hex()])
    result = await replay(
        parse_replay(text), host="127.0.0.1", port=service.port, imei="356307042441013",
        ack_timeout=5,
    )  # fmt: skip
    got = [(r["line"], r["ok"], r["got"]) for r in result["results"]]
    assert got[0] == (0, True, "accepted (01)")  # no handshake line: --imei's is sent
    assert got[1][:2] == (1, True) and got[1][2].startswith("ACK ")
    assert got[2] == (2, True, "server closed the connection")
    assert got[3] == (3, False, "not sent: connection closed")
    assert result["closed_by_server"] and not result["ok"]


# --------------------------------------------------------------------------- console script


def _simulate_argv() -> list[str]:
    from teltonika_ingest.cli import main as cli

    if "teltonika_ingest.cli.simulate" in cli.SUBCOMMAND_MODULES:
        return [str(BIN / "teltonika-ingest"), "simulate"]
    return [sys.executable, "-m", "teltonika_ingest.cli.simulate"]  # not registered yet


@pytest.fixture
def twistd_service(redis_session: RedisProcess, tmp_path: Path) -> Iterator[int]:
    twistd = BIN / "twistd"
    assert twistd.exists(), f"{twistd} missing: install the project (make test does)"
    assert shutil.which("redis-server"), "redis-server not on PATH"
    port, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELTONIKA_", "REDIS_"))}
    log = tmp_path / "twistd.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "teltonika-ingest",
             "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
             "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--metrics", f"tcp:{http}:interface=127.0.0.1", "--instance-id", "test-twistd"],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "service not ready in 30 s"
            time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.mark.integration
def test_console_script_against_twistd(
    twistd_service: int, redis_session: RedisProcess, tmp_path: Path
) -> None:
    port = twistd_service
    run = subprocess.run(
        [*_simulate_argv(), "--port", str(port), "--devices", "4", "--records", "10",
         "--packets", "3", "--codec", "8E", "--json", "--max-time", "60"],
        capture_output=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    summary = json.loads(run.stdout)
    assert summary["packets_acked"] == 12 and summary["records_acked"] == 120
    assert summary["errors_total"] == 0
    assert set(summary["ack_latency_ms"]) == {"count", "p50", "p95", "p99", "max", "mean"}
    assert len(_stream(redis_session)) == 120

    # Two simulator processes, merged.
    run = subprocess.run(
        [*_simulate_argv(), "--port", str(port), "--devices", "4", "--records", "1",
         "--packets", "2", "--processes", "2", "--imei-base", "35100000000000", "--json"],
        capture_output=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    merged = json.loads(run.stdout)
    assert merged["processes"] == 2 and merged["devices"] == 4
    assert merged["packets_acked"] == 8 and merged["ack_latency_ms"]["count"] == 8

    # Replay of a captured log, human output.
    path, records = _replay_file(tmp_path)
    run = subprocess.run(
        [*_simulate_argv(), "--port", str(port), "--replay", str(path)],
        capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()
    lines = run.stdout.decode().splitlines()
    assert lines[0].startswith("line    2: IMEI handshake 356307042441013 -> accepted (01)")
    assert all(" -> ACK " in line and line.endswith("ok") for line in lines[1:])
    assert len(_stream(redis_session)) == 120 + 8 + records


def test_cli_rejects_bad_options() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "teltonika_ingest.cli.simulate", "--devices", "2"],
        capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2
    assert b"give --duration or --packets" in run.stderr


@pytest.fixture(autouse=True)
def _no_leftover_calls() -> Iterator[None]:
    yield
    # A simulation must leave nothing scheduled behind (its loops and timers are its own).
    pending = [c for c in reactor.getDelayedCalls() if "simulate" in repr(getattr(c, "func", ""))]
    assert not pending, pending
