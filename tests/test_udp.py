"""UDP listener: publish then ACK; a resent datagram is re-ACKed, not republished."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.codec import AvlPacket, UdpPacket, encode_udp_datagram
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.udp import UdpListener

from device import wait_for
from redisproc import RedisProcess
from support import IMEI as IMEI_TCP
from support import FakePublisher, avl_frame, make_record, vector
from test_service_integration import start, stream_entries

IMEI = "352093086403655"


def datagram(packet_id: int, avl_id: int, n: int = 2, start: int = 0, imei: str = IMEI) -> bytes:
    packet = AvlPacket(codec="8E", records=tuple(make_record(start + i) for i in range(n)))
    return encode_udp_datagram(UdpPacket(packet_id, avl_id, imei, packet))


#: not on any allow list of these tests; a valid Luhn check digit
UNLISTED = "356307042441013"
#: 15 digits with a wrong Luhn check digit
BAD_LUHN = "356307042441012"


class _Authority:
    """Allows the IMEIs of ``allowed``; answers at once or with a Deferred the test fires."""

    def __init__(self, allowed: set[str], deferred: bool = False) -> None:
        self.allowed = allowed
        self.deferred = deferred
        self.pending: list[tuple[str, defer.Deferred[bool]]] = []

    def check(self, imei: str) -> bool | defer.Deferred[bool]:
        if not self.deferred:
            return imei in self.allowed
        d: defer.Deferred[bool] = defer.Deferred()
        self.pending.append((imei, d))
        return d


class FakeUdpTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def write(self, data: bytes, addr: object) -> None:
        self.sent.append((data, addr))


class UdpUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.publisher = FakePublisher()
        self.listener = UdpListener(
            publisher=self.publisher,  # type: ignore[arg-type]
            metrics=self.metrics,
            clock=self.clock,
            dedup_window=60,
        )
        self.transport = FakeUdpTransport()
        self.listener.transport = self.transport  # type: ignore[assignment]
        self.addr = ("192.0.2.1", 4000)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0

    def test_vector_acked_only_after_publish(self) -> None:
        v = vector("udp-codec8-one-record")
        self.listener.datagramReceived(bytes.fromhex(v["hex"]), self.addr)
        self.assertEqual(self.transport.sent, [])
        imei, packet, d = self.publisher.calls[0]
        self.assertEqual((imei, len(packet.records)), (v["expect"]["imei"], 1))
        d.callback(1)
        self.assertEqual(self.transport.sent, [(bytes.fromhex(v["expect"]["ack_hex"]), self.addr)])

    def test_no_ack_on_publish_failure_and_resend_is_published(self) -> None:
        dg = datagram(1, 7)
        self.listener.datagramReceived(dg, self.addr)
        self.publisher.calls[0][2].errback(RuntimeError("redis down"))
        self.assertEqual(self.transport.sent, [])
        self.listener.datagramReceived(dg, self.addr)
        self.assertEqual(len(self.publisher.calls), 2)
        self.publisher.calls[1][2].callback(2)
        self.assertEqual(len(self.transport.sent), 1)

    def test_resend_within_window_reacked_not_republished(self) -> None:
        self.listener.datagramReceived(datagram(1, 7), self.addr)
        self.publisher.calls[0][2].callback(2)
        self.clock.advance(30)
        self.listener.datagramReceived(datagram(2, 7), self.addr)  # new packet id, same AVL id
        self.assertEqual(len(self.publisher.calls), 1)
        ack = self.transport.sent[-1][0]
        self.assertEqual(ack, struct.pack(">HHBBB", 5, 2, 1, 7, 2))
        self.assertEqual(self.sample("teltonika_udp_datagrams_total", result="duplicate"), 1)

    def test_same_avl_id_after_window_or_other_content_is_new(self) -> None:
        self.listener.datagramReceived(datagram(1, 7), self.addr)
        self.publisher.calls[0][2].callback(2)
        self.listener.datagramReceived(datagram(2, 7, start=50), self.addr)  # other records
        self.assertEqual(len(self.publisher.calls), 2)
        self.publisher.calls[1][2].callback(2)
        self.clock.advance(61)
        self.listener.datagramReceived(datagram(3, 7), self.addr)
        self.assertEqual(len(self.publisher.calls), 3)

    def test_resend_while_first_in_flight_is_not_published_twice(self) -> None:
        self.listener.datagramReceived(datagram(1, 9), self.addr)
        self.listener.datagramReceived(datagram(1, 9), self.addr)
        self.assertEqual(len(self.publisher.calls), 1)

    def use_authority(self, authority: _Authority) -> None:
        self.listener.authority = authority

    def test_refused_imei_not_published_not_acked(self) -> None:
        self.use_authority(_Authority({IMEI}))
        self.listener.datagramReceived(datagram(1, 7, imei=UNLISTED), self.addr)
        self.assertEqual(self.publisher.calls, [])
        self.assertEqual(self.transport.sent, [])
        self.assertEqual(self.sample("teltonika_udp_datagrams_total", result="rejected"), 1)
        # the listed IMEI still goes through, and a resend of the refused one is checked again
        self.listener.datagramReceived(datagram(2, 8), self.addr)
        self.publisher.calls[0][2].callback(2)
        self.assertEqual(len(self.transport.sent), 1)
        self.listener.datagramReceived(datagram(3, 7, imei=UNLISTED), self.addr)
        self.assertEqual(len(self.publisher.calls), 1)
        self.assertEqual(self.sample("teltonika_udp_datagrams_total", result="rejected"), 2)

    def test_publish_waits_for_a_deferred_decision(self) -> None:
        authority = _Authority({IMEI}, deferred=True)
        self.use_authority(authority)
        self.listener.datagramReceived(datagram(1, 7), self.addr)
        self.listener.datagramReceived(datagram(1, 7), self.addr)  # resend while deciding
        self.assertEqual(self.publisher.calls, [])
        self.assertEqual(len(authority.pending), 1)
        authority.pending[0][1].callback(True)
        self.assertEqual(len(self.publisher.calls), 1)
        self.publisher.calls[0][2].callback(2)
        self.assertEqual(len(self.transport.sent), 1)

    def test_authority_failure_refuses(self) -> None:
        authority = _Authority(set(), deferred=True)
        self.use_authority(authority)
        self.listener.datagramReceived(datagram(1, 7), self.addr)
        authority.pending[0][1].errback(RuntimeError("redis down"))
        self.assertEqual(self.publisher.calls, [])
        self.assertEqual(self.transport.sent, [])
        self.assertEqual(self.sample("teltonika_udp_datagrams_total", result="rejected"), 1)
        # not remembered as in progress: the resend is checked again
        self.listener.datagramReceived(datagram(1, 7), self.addr)
        self.assertEqual(len(authority.pending), 2)

    def test_garbage_counted_not_raised(self) -> None:
        for junk in (
            b"",
            b"\x00",
            b"\xff" * 40,
            bytes.fromhex(vector("udp-codec8-one-record")["hex"])[:-3],
        ):
            self.listener.datagramReceived(junk, self.addr)
        self.assertEqual(self.transport.sent, [])
        self.assertEqual(self.publisher.calls, [])
        self.assertEqual(self.sample("teltonika_udp_datagrams_total", result="malformed"), 4)


class _Client(DatagramProtocol):
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: object) -> None:
        self.replies.append(data)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_udp_end_to_end(redis_proc: RedisProcess, tmp_path: Path) -> None:
    port = free_udp_port()
    running = await start(
        redis_proc, tmp_path, "--udp-port", str(port), "--udp-interface", "127.0.0.1"
    )
    client = _Client()
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        v = vector("udp-codec8-one-record")
        dg = bytes.fromhex(v["hex"])
        client_port.write(dg, ("127.0.0.1", port))
        await wait_for(lambda: len(client.replies) == 1)
        assert client.replies[0] == bytes.fromhex(v["expect"]["ack_hex"])
        client_port.write(dg, ("127.0.0.1", port))  # our ACK "was lost": the device resends
        await wait_for(lambda: len(client.replies) == 2)
        assert client.replies[1] == client.replies[0]
        entries = stream_entries(redis_proc)
        assert len(entries) == 1
        assert entries[0]["imei"] == v["expect"]["imei"]
        assert running.sample("teltonika_records_total", codec="8") == 1
    finally:
        await defer.maybeDeferred(client_port.stopListening)
        await running.svc.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_udp_refuses_what_tcp_refuses(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """The TCP handshake's authority applies to UDP: an IMEI that is not on the allow list
    (file or Redis set), or fails the Luhn check, gets no ACK and nothing is stored."""
    port = free_udp_port()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{IMEI}\n")
    in_set = "354017118537444"  # on the Redis set only
    redis_proc.cmd("SADD", "devices:allowed", in_set)
    running = await start(
        redis_proc, tmp_path, "--udp-port", str(port), "--udp-interface", "127.0.0.1",
        "--allow-list", str(allow), "--allow-list-key", "devices:allowed", "--luhn",
    )  # fmt: skip
    client = _Client()
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        for i, imei in enumerate((UNLISTED, BAD_LUHN)):
            client_port.write(datagram(1, 10 + i, imei=imei), ("127.0.0.1", port))
        client_port.write(datagram(2, 20), ("127.0.0.1", port))
        client_port.write(datagram(3, 21, imei=in_set), ("127.0.0.1", port))
        await wait_for(lambda: len(client.replies) >= 2)
        await wait_for(
            lambda: running.sample("teltonika_udp_datagrams_total", result="rejected") == 2,
            timeout=3.0,
        )
        # both refusals are decided: no ACK can follow them any more
        assert sorted(r[-2] for r in client.replies) == [20, 21]  # the ACKs' AVL packet ids
        assert {e["imei"] for e in stream_entries(redis_proc)} == {IMEI, in_set}
        assert running.sample("teltonika_udp_datagrams_total", result="ok") == 2
    finally:
        await defer.maybeDeferred(client_port.stopListening)
        await running.svc.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_udp_is_not_read_during_the_drain(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """Shutdown step 2 stops reading UDP as it does TCP: a datagram arriving while the
    drain waits is neither published nor ACKed (the device resends it to whoever is up),
    so UDP traffic cannot keep the drain open; the TCP packet in flight is still ACKed."""
    port = free_udp_port()
    running = await start(
        redis_proc, tmp_path, "--udp-port", str(port), "--udp-interface", "127.0.0.1",
        "--publish-timeout", "20",
    )  # fmt: skip
    client = _Client()
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    stopping: defer.Deferred[None] | None = None
    try:
        dev = await running.device()
        redis_proc.cmd("CLIENT", "PAUSE", "20000", "WRITE")  # scripts wait, PING answers
        dev.send(avl_frame(2))
        await wait_for(lambda: running.sample("teltonika_publish_inflight") == 1)
        stopping = running.svc.stopService()
        await wait_for(lambda: running.svc.factory.draining)
        assert running.svc.udp is not None
        udp_port = running.svc.udp.transport
        assert udp_port not in reactor.getReaders(), "UDP still read during the drain"
        client_port.write(datagram(1, 1), ("127.0.0.1", port))
        redis_proc.cmd("CLIENT", "UNPAUSE")
        assert await dev.expect(4) == struct.pack(">I", 2)  # the drained packet: ACKed
        await stopping
        assert [e["imei"] for e in stream_entries(redis_proc)] == [IMEI_TCP, IMEI_TCP]
        assert client.replies == []
        assert running.sample("teltonika_udp_datagrams_total", result="ok") == 0
    finally:
        redis_proc.cmd("CLIENT", "UNPAUSE")
        await defer.maybeDeferred(client_port.stopListening)
        if stopping is None:
            await running.svc.stopService()
